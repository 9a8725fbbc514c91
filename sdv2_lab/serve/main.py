"""``sdv2 serve``: build the engine from ``conf/serve.yaml`` (+ overrides), warm it up, serve the page.

    sdv2 serve                                     # tiny model, CPU, dummy weights, http://127.0.0.1:7860
    sdv2 serve serve.port=8000 serve.max_streams=8 steps=1
    sdv2 serve backbone=wan_1_3b weights=real device=cuda height=480 width=832 serve.taehv_vae=taehv ...
"""
from __future__ import annotations

import logging
import os

import hydra
from omegaconf import DictConfig

from ..configs import CONF_DIR

log = logging.getLogger("sdv2.serve")


def serve(cfg: DictConfig) -> None:
    import uvicorn

    from ..preflight import check_config
    from .app import create_app
    from .background import uvicorn_config
    from .engine import Engine
    from .settings import ServeSettings

    settings = ServeSettings.from_config(cfg.get("serve"))
    check_config(cfg)
    warning = settings.exposure_warning()
    if warning:
        log.warning("%s", warning)
    engine = Engine(cfg, settings)
    info = engine.describe()
    warm = settings.warmup is True or (settings.warmup == "auto" and engine.pipe.device.type == "cuda")
    if warm and engine.pipe.warmup_s is None:   # the build warms up on CUDA already (warmup=auto)
        engine.warmup()
    weights = "DUMMY weights: the output is noise, timings are real" if engine.weights_are_dummy else "real weights"
    log.info("sdv2 serve: %s / vae %s / %s / %d step(s) by default / %dx%d on %s (%s); up to %d streams; %s",
             info["model"], info["vae"], info["mode"], info["default_steps"], info["height"], info["width"],
             info["device"], info["dtype"], settings.max_streams, weights)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(f"sdv2 serve: open {settings.scheme}://{host}:{settings.port} ({weights}; Ctrl+C stops)", flush=True)
    try:
        uvicorn.Server(uvicorn_config(create_app(engine, settings), settings)).run()
    finally:
        engine.shutdown()


def _user_errors() -> tuple:
    if os.environ.get("SDV2_TRACEBACK"):
        return ()
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    return ValueError, TypeError, OSError, RuntimeError, HydraException, OmegaConfBaseException


@hydra.main(config_path=str(CONF_DIR), config_name="serve", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        serve(cfg)
    except KeyboardInterrupt:       # Ctrl+C (uvicorn re-raises the signal after its graceful shutdown): stopped
        print("sdv2 serve: stopped (Ctrl+C)", flush=True)
    except _user_errors() as exc:  # one line saying what to change, not a traceback (SDV2_TRACEBACK=1 shows it)
        raise SystemExit(f"sdv2 serve: error: {exc}") from None


if __name__ == "__main__":
    main()
