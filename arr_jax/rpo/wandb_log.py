"""Weights & Biases logging of a training run (``config.log.wandb``; off by default).

`RunWriter` stands where `train` used a tensorboardX ``SummaryWriter``: every ``add_scalar`` and
``add_image`` goes to TensorBoard and, with W&B on, to the W&B run as the same key at the same step
(the RPO iteration), so W&B holds exactly TensorBoard's scalars and the held-out evaluation grids
(``eval/grid``). At the end `train` logs ``lora/final.safetensors`` as an artifact of type ``lora``
(metadata: the LoRA file's own run metadata). Process 0 only.

The W&B run lives in ``<workdir>/wandb/``; its id is kept in ``<workdir>/wandb_run_id`` so a resumed
run continues the same W&B run. ``log.wandb_mode`` (or the ``WANDB_MODE`` environment variable)
``offline`` needs no network or account: ``wandb sync <workdir>/wandb/offline-run-*`` uploads it later.
Needs the optional extra: ``pip install -e ".[wandb]"``.
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

MODES = ("", "online", "offline", "disabled")


def wandb_enabled(cfg) -> bool:
    return bool(cfg.get("log", {}).get("wandb", False)) if "log" in cfg else False


def check_wandb(cfg) -> None:
    """Before anything loads: with ``log.wandb`` on, the ``wandb`` package is installed and ``log.wandb_mode``
    is one W&B knows; one-line ValueError / ImportError naming the key otherwise."""
    if not wandb_enabled(cfg):
        return
    mode = cfg.log.get("wandb_mode", "")
    if mode not in MODES:
        raise ValueError(f"bad config value log.wandb_mode: {mode!r} is not one of {MODES}")
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ImportError("config.log.wandb=True needs Weights & Biases: pip install -e \".[wandb]\" (or pass "
                          "--config.log.wandb=False)") from None


def start_wandb(cfg, workdir: Path, config: dict):
    """The W&B run of ``cfg.log`` in ``<workdir>/wandb`` (resumed by the id in ``<workdir>/wandb_run_id``), with
    ``config`` (the run's metadata, `run_metadata` + the config) as its config; None with ``log.wandb`` off."""
    if not wandb_enabled(cfg):
        return None
    check_wandb(cfg)
    import wandb

    lg = cfg.log
    id_file = workdir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id + "\n")
    return wandb.init(project=lg.get("wandb_project", "") or "arr_jax", entity=lg.get("wandb_entity", "") or None,
                      name=lg.get("wandb_name", "") or workdir.absolute().name, dir=str(workdir), id=run_id,
                      resume="allow", mode=lg.get("wandb_mode", "") or None, job_type="rpo", config=config,
                      settings=wandb.Settings(console="off", quiet=True))


class RunWriter:
    """TensorBoard (``tb``, a tensorboardX ``SummaryWriter``) and, when ``wb`` is a W&B run, W&B behind
    ``SummaryWriter``'s calls. W&B gets one row per step: values of the same step are gathered and logged
    together when a later step arrives, on `flush` and on `close`."""

    def __init__(self, tb, wb=None):
        self.tb, self.wb = tb, wb
        self._step: int | None = None
        self._row: dict[str, Any] = {}

    def _put(self, key: str, value: Any, step: int) -> None:
        if self.wb is None:
            return
        if self._step is not None and step != self._step:
            self._commit()
        self._step = int(step)
        self._row[key] = value

    def _commit(self) -> None:
        if self.wb is not None and self._row:
            self.wb.log(self._row, step=self._step)
        self._row = {}

    def add_scalar(self, key: str, value: float, step: int) -> None:
        self.tb.add_scalar(key, value, step)
        self._put(key, float(value), step)

    def add_image(self, key: str, image, step: int, dataformats: str = "HWC") -> None:
        """``image``: uint8 (H, W, 3) (``dataformats="HWC"``, the only layout W&B is given)."""
        self.tb.add_image(key, image, step, dataformats=dataformats)
        if self.wb is not None:
            import wandb

            if dataformats != "HWC":
                raise ValueError(f"RunWriter.add_image: W&B needs HWC images, got dataformats={dataformats!r}")
            self._put(key, wandb.Image(image, caption=f"{key} after iteration {step}"), step)

    def log_lora(self, path: Path | None, metadata: dict | None = None) -> None:
        """``path`` (the final LoRA) as a W&B artifact of type ``lora`` named ``lora-<run id>``."""
        if self.wb is None or path is None or not Path(path).exists():
            return
        import wandb

        self._commit()
        art = wandb.Artifact(f"lora-{self.wb.id}", type="lora", metadata=metadata or {},
                             description="diffusers / PEFT LoRA (arr_jax.convert.lora_peft) after the run")
        art.add_file(str(path), name=Path(path).name)
        self.wb.log_artifact(art, aliases=["latest", "final"])

    def flush(self) -> None:
        self.tb.flush()
        self._commit()

    def close(self) -> None:
        self._commit()
        self.tb.close()
        if self.wb is not None:
            self.wb.finish()
            self.wb = None


def log_config():
    """The ``log`` config section every training config shares: TensorBoard always (``workdir/tensorboard``);
    ``wandb`` True adds Weights & Biases (the same scalars, eval grids, final LoRA; ``pip install -e ".[wandb]"``)."""
    import ml_collections

    return ml_collections.ConfigDict(dict(
        wandb=False, wandb_project="arr_jax",
        wandb_entity="",   # "" = your default entity
        wandb_name="",     # "" = the workdir's name
        wandb_mode=""))    # "" = WANDB_MODE or W&B's default; "online", "offline" (no network) or "disabled"
