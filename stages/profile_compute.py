"""Stage profile: the compute model at the reference's setting (params.yaml `profile:`).

Writes metrics/profile.json (flat keys), profile/compute.csv (one row per model) and
profile/devices.csv (one row per model x device profile)."""

from vitpipe import params, pipeline, stage
from vitpipe.atomic import write_json, write_text
from vitpipe.costmodel.table import run, to_csv, validate
from vitpipe.hardware import probe


def main(argv):
    p = validate(params.read_yaml().get("profile") or {})
    local = probe.local_device()
    metrics, rows, device_rows = run(p, local, probe.calibrate_mfu(peak_flops=local.peak("fp32")))
    write_json(pipeline.PROFILE_METRICS, metrics)
    write_text(pipeline.PROFILE_COMPUTE, to_csv(rows))
    write_text(pipeline.PROFILE_DEVICES, to_csv(device_rows))
    for r in rows:
        plan = f"{r['micro_batch']} x {r['accum_steps']}" if r["micro_batch"] else "does not fit"
        print(
            f"{r['model']:<10} {r['params'] / 1e6:8.1f} M  {r['train_gflops']:8.1f} GFLOP/img  "
            f"peak {r['peak_gib']:7.1f} GiB  fits {str(r['fits']):5}  plan {plan:<9} ETA {r['eta_h']:7.1f} h"
        )
    print(
        f"this machine, a small ViT: {metrics['local_img_per_s']} img/s measured, "
        f"{metrics['local_predicted_img_per_s']} predicted by the time model"
    )


if __name__ == "__main__":
    stage.run(main)
