"""What one GPU can at most give each backbone: its recipe's analytic FLOPs per output frame (the FLOP model every
MFU here uses, ``settings.frame_flops``) against the dense bf16 peak, with the Wan VAE, LightVAE or TAEHV both
ways. No GPU needed: a steady-state stream (the KV window full), 480x832 unless told.

    python experiments/ceilings.py [--height 480 --width 832 --peak 800 --mfu 0.5] [--json out.json]

FPS ceiling = peak / FLOPs per frame (100 % MFU); the "at MFU" column divides the peak by ``--mfu`` first (this
engine's best measured end-to-end MFU at 1.3B / 1 step / Wan VAE is ~38 %, the DiT alone ~50 %). Where an issue's
target FPS sits above the 100 % ceiling, no kernel work reaches it: only fewer FLOPs (a smaller window, fewer
steps, a lighter VAE) or more GPUs do.
"""
import argparse
import json

from paper_numbers import PLUGIN_PAPER_FPS
from sdv2_lab.configs import CONF_DIR, compose_config
from sdv2_lab.settings import frame_flops, pipeline_config

VAES = {"wan": "wan", "lightvae": "lightvae", "taehv both ways": "taehv_full"}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--peak", type=float, default=800.0, help="dense bf16 TFLOP/s (H100/H200 measured: ~800)")
    p.add_argument("--mfu", type=float, default=0.5, help="an end-to-end MFU to quote beside the ceiling")
    p.add_argument("--backbones", default=None, help="comma separated (default: every conf/backbone entry but tiny)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    names = a.backbones.split(",") if a.backbones else sorted(
        f.stem for f in (CONF_DIR / "backbone").glob("*.yaml") if f.stem != "tiny")
    rows = []
    print(f"| backbone | mode | steps | forwards / latent frame | attended frames | DiT TFLOP / frame | "
          + " | ".join(f"{v}: ceiling ({a.mfu:.0%} MFU) FPS" for v in VAES) + " | own claim |")
    print("|---" * (7 + len(VAES)) + "|")
    for name in names:
        for mode in ("single_wo", "single"):
            base = [f"backbone={name}", f"mode={mode}", f"height={a.height}", f"width={a.width}", "device=cpu"]
            try:
                cfg = compose_config("config", base)
                pc = pipeline_config(cfg).validate()
            except ValueError as e:      # a recipe that does not run in this mode (the rolling window in single: fine)
                print(f"| {name} | {mode} | refused: {str(e)[:80]} |")
                continue
            row = dict(backbone=name, mode=mode, steps=len(pc.denoising_steps),
                       forwards=pc.forwards_per_latent_frame, attended_frames=pc.attended_frames,
                       dit_tflop=frame_flops(cfg, vae=False).dit / 1e12)
            cells = []
            for label, vae in VAES.items():
                f = frame_flops(compose_config("config", base + [f"vae={vae}"])).total
                row[f"ceiling_fps_{vae}"] = a.peak * 1e12 / f
                row[f"at_mfu_fps_{vae}"] = a.mfu * a.peak * 1e12 / f
                cells.append(f"{row[f'ceiling_fps_{vae}']:.1f} ({row[f'at_mfu_fps_{vae}']:.1f})")
            claim = PLUGIN_PAPER_FPS.get(name)
            row["own_claim"] = claim
            rows.append(row)
            print(f"| {name} | {mode} | {row['steps']} | {row['forwards']:g} | {row['attended_frames']} | "
                  f"{row['dit_tflop']:.2f} | " + " | ".join(cells) +
                  f" | {f'{claim[0]:g} ({claim[1]})' if claim else '-'} |", flush=True)
    print(f"peak {a.peak:g} TFLOP/s dense bf16; {a.height}x{a.width}; steady state (the KV window full); analytic "
          f"FLOPs (sdv2_lab/flops.py), no measurement")
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
