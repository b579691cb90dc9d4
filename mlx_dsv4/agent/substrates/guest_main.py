"""Inside the VM guest: run one tool call with the runner of the process substrate and,
once the tool has exited, write its outcome as one JSON line to the result port (a
virtio-serial port only root may open; the console is left to boot messages). Started by
the guest's ``/init`` as ``python3 guest_main.py /dev/<result port>`` from the read-only
tool share; imports only the standard library and the copy of ``base.py`` beside it."""

import base64
import json
import os
import sys

SHARE = os.path.dirname(os.path.abspath(__file__))


def main():
    result_port = sys.argv[1]
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
    with open(result_port, "wb") as out:  # buffered: a port takes at most 32 KiB per write
        out.write(frame + b"\n")
        out.flush()


if __name__ == "__main__":
    main()
