"""The one exception type a user sees: a message that names the culprit and the fix."""


class UserError(Exception):
    """Bad input (a param, a file, the network). Stages print it as one line and exit 2."""


class ParamError(UserError):
    """A params.yaml value is not allowed. Message: `key: value — what is allowed`."""

    def __init__(self, key: str, value, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"params.yaml: {key} = {value!r} is not allowed: {allowed}")
