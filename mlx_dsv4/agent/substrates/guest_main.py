"""Inside the VM guest: run one tool call with the runner of the process substrate and
write its outcome to the console between markers. Started by the guest's ``/init`` as
``python3 guest_main.py /dev/<console>`` from the read-only tool share; imports only the
standard library and the copy of ``base.py`` beside it."""

import base64
import json
import os
import sys

SHARE = os.path.dirname(os.path.abspath(__file__))
BEGIN, END = b"<<mlx-dsv4-vm-result>>", b"<</mlx-dsv4-vm-result>>"


def main():
    console = sys.argv[1]
    sys.path.insert(0, SHARE)
    import substrate_base

    with open(os.path.join(SHARE, "call.json")) as f:
        call = json.load(f)
    argv = [sys.executable, "-I"] + ([] if call["site"] else ["-S"]) + [os.path.join(SHARE, "_runner.py")]
    env = {"PATH": "/bin", "HOME": "/work", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONIOENCODING": "utf-8", "LD_LIBRARY_PATH": os.environ.get("LD_LIBRARY_PATH", "")}
    exit_code, sig, stdout, stderr, status, truncated, duration = substrate_base.run_child(
        argv, stdin_data=call["spec"].encode(), cwd="/work", env=env, timeout=call["timeout"],
        output_bytes=call["output_bytes"])
    frame = json.dumps({
        "exit_code": exit_code, "signal": sig, "stdout": base64.b64encode(stdout).decode(),
        "stderr": base64.b64encode(stderr).decode(), "status": status, "truncated": truncated, "duration": duration,
    }).encode()
    with open(console, "wb") as out:
        out.write(b"\n" + BEGIN + base64.b64encode(frame) + END + b"\n")
        out.flush()


if __name__ == "__main__":
    main()
