"""``python -m arr_jax.preflight --config FILE[:variant] --topology=NAME [--json=FILE]``: see `arr_jax.preflight`.

Exit status 0 when the iteration fits the topology's HBM, 1 when it does not (the report names the
program and the figure that breaks it), 2 for an input to fix (unknown topology, no libtpu, a mesh
that does not divide the slice): one line saying what to do.
"""
from __future__ import annotations

import json
import os
import sys


def main(argv) -> None:
    del argv
    from absl import flags

    from arr_jax.cli import config_from_flags
    from arr_jax.preflight import TopologyError, format_report, preflight

    f = flags.FLAGS
    cfg = config_from_flags()
    if "rpo" not in cfg:
        print(f"preflight: {f['config'].value!r} is not a training config (no rpo section)", file=sys.stderr)
        sys.exit(2)
    try:
        rep = preflight(cfg, f.topology, progress=lambda s: print(s, flush=True))
    except TopologyError as e:
        print(f"preflight: {e}", file=sys.stderr)
        sys.exit(2)
    rep["config"] = sys.argv[sys.argv.index("--config") + 1] if "--config" in sys.argv else rep["config"]
    print(format_report(rep))
    if f.json:
        with open(f.json, "w") as fh:
            json.dump(rep, fh, indent=1, default=str)
        print(f"wrote {f.json}")
    sys.exit(0 if rep["fits"] else 1)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from absl import flags

    flags.DEFINE_string("topology", "v5p-8", "a TPU topology name (v5p-8, v6e-8, ... see arr_jax.preflight.TOPOLOGIES) "
                        "or a libtpu layout such as v6e:4x4")
    flags.DEFINE_string("json", "", "also write the report here")
    from arr_jax.cli import run_main

    run_main(main)
