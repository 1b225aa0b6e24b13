"""Audit checkpoints: `python evaluate.py --checkpoint A.ckpt [B.ckpt ...] --config configs/audit.yaml [--out DIR]`.

Writes DIR/report.json (every number, the config, checkpoint hashes, seeds, versions) and DIR/report.html;
finished (checkpoint, section) results are cached in DIR/cache and skipped when the audit runs again.
"""

from robustattr.audit import main

if __name__ == "__main__":
    main()
