"""The worker protocol: the committed generated module matches proto/ and imports cleanly."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ds4tp import proto_gen


def test_generated_module_is_up_to_date():
    pytest.importorskip("grpc_tools", reason="grpcio-tools (test extra) compiles the .proto")
    fresh = proto_gen.compile_descriptor()
    assert proto_gen.committed_descriptor() == fresh, \
        "ds4tp/rpc/worker_pb2.py is stale: run python -m ds4tp.proto_gen"
    # and the writer is deterministic: regenerating gives the committed text
    assert proto_gen.render_module(fresh) == proto_gen.MODULE_PATH.read_text()


def test_check_mode_detects_a_stale_module(tmp_path, monkeypatch):
    pytest.importorskip("grpc_tools")
    stale = tmp_path / "worker_pb2.py"
    fd = proto_gen.compile_descriptor()
    fd.message_type[0].name = "Renamed"
    stale.write_text(proto_gen.render_module(fd))
    monkeypatch.setattr(proto_gen, "MODULE_PATH", stale)
    assert proto_gen.main(["--check"]) == 1


@pytest.mark.parametrize("impl", ["default", "python"])
def test_messages_round_trip_in_a_fresh_interpreter(impl):
    """No runtime-version guard, with the C (upb) and the pure-Python protobuf backends."""
    code = """
from ds4tp.rpc import pb, SERVICE, PROTOCOL_VERSION, WorkerStub
r = pb.StepReply(op=2**64 - 1, token=7, sampled=True, top_logprobs=[pb.TokenLogprob(token=1, logprob=-0.5)])
assert pb.StepReply.FromString(r.SerializeToString()) == r
s = pb.Sampling(temperature=0.5, logit_bias={3: float("-inf")})
assert pb.Sampling.FromString(s.SerializeToString()).logit_bias[3] == float("-inf")
assert [m.name for m in SERVICE.methods] == ["Info", "Health", "Prefill", "Decode", "Release", "Shutdown"]
assert PROTOCOL_VERSION == 1 and pb.LoadState.Name(pb.READY) == "READY"
print("ok")
"""
    env = dict(os.environ)
    if impl == "python":
        env["PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"] = "python"
    r = subprocess.run([sys.executable, "-c", code], cwd=proto_gen.REPO, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
