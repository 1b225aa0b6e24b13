"""Run loading routes under Python audit hooks (PEP 578) and write what each did to a JSON file: every module
imported, file opened, directory created, connection attempted and process started, plus the outcome. One
process serves several files (one report each), since starting one costs seconds of imports.

    python -m tests.helpers.probe OUT.json classifier CKPT [CKPT ...]
    python -m tests.helpers.probe OUT.json audit CKPT AUDIT_OUT
"""

import contextlib
import io
import json
import sys

events: dict[str, list[str]] = {}


def hook(event, args):
    if not events:
        return
    if event == "import":
        events["imports"].append(args[0])
    elif event == "open" and isinstance(args[0], str | bytes):
        events["opened"].append(str(args[0]))
    elif event == "os.mkdir":
        events["mkdir"].append(str(args[0]))
    elif event in ("socket.connect", "socket.getaddrinfo", "urllib.Request"):
        events["network"].append(repr(args)[:200])
    elif event in ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn"):
        events["processes"].append(repr(args)[:200])


def run(load) -> dict:
    events.update({"imports": [], "opened": [], "mkdir": [], "network": [], "processes": []})
    outcome = {"ok": True, "error": None}
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            load()
    except BaseException as err:  # the outcome is the report
        outcome = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    report = {**{k: list(v) for k, v in events.items()}, **outcome, "stdout": stdout.getvalue()}
    events.clear()
    return report


def main() -> None:
    out, route, *paths = sys.argv[1:]
    # The libraries are imported before the hook goes in: what it records is what loading a file causes.
    from robustattr.audit import run_audit
    from robustattr.audit.sections import Curvature
    from robustattr.checkpoint import load_classifier

    sys.addaudithook(hook)
    if route == "classifier":
        reports = [run(lambda p=p: load_classifier(p)) for p in paths]
    else:
        section = Curvature(power_iters=1, num_samples=4)
        reports = [run(lambda: run_audit([paths[0]], [section], out=paths[1], num_samples=4, html=False))]
    with open(out, "w") as f:
        json.dump(reports, f)


if __name__ == "__main__":
    main()
