"""Protos at the edge: control-plane specs are validated; unread GPU fields stay unset."""

from __future__ import annotations

import pytest

from agent import config, convert
from agent.core import types
from protos.synapse.v1 import common_pb2


def test_a_valid_spec_from_the_control_plane_becomes_an_engine_spec():
    msg = common_pb2.BackendSpec(name="llama-2", engine=common_pb2.ENGINE_KIND_VLLM,
                                 model="meta/llama", served_model_names=["llama"],
                                 gpu_indices=[1], memory_required_bytes=2**34,
                                 task=common_pb2.BACKEND_TASK_GENERATE)
    spec = convert.spec_from_proto(msg)
    assert (spec.engine, spec.port, spec.gpu_memory_utilization, spec.gpu_indices) == (
        "vllm", None, 0.9, (1,))
    assert spec.models == ("llama",)


@pytest.mark.parametrize(("fields", "words"), [
    ({"name": "Bad Name", "engine": 1, "model": "m"}, "invalid"),
    ({"name": "a", "model": "m"}, "engine kind is unspecified"),
    ({"name": "a", "engine": 1}, "model is empty"),
    ({"name": "a", "engine": 4, "model": "m"}, "url is required"),
    ({"name": "a", "engine": 1, "model": "m", "gpu_memory_utilization": 1.5}, "out of range"),
])
def test_bad_specs_are_rejected_with_a_reason(fields, words):
    with pytest.raises(convert.SpecError, match=words):
        convert.spec_from_proto(common_pb2.BackendSpec(**fields))


def test_gpu_fields_nvml_could_not_read_stay_unset():
    msg = convert.gpu(types.GpuSample(index=0, uuid="u", name="n", memory_total_bytes=10,
                                      power_watts=None,
                                      processes=(types.GpuProcess(7, 5, "sim"),)))
    assert msg.HasField("memory_total_bytes") and not msg.HasField("power_watts")
    assert msg.processes[0].backend_name == "sim"


def test_the_seat_count_reaches_the_control_planes_view_of_the_backend():
    from controlplane.api import agent_messages

    status = types.BackendStatus(name="b", url="http://127.0.0.1:8000", models=("m",),
                                 engine="vllm", task="generate", phase="ready",
                                 max_num_seqs=48)
    state = agent_messages.backend_state("n1", convert.backend(status))
    assert (state.key, state.max_num_seqs) == ("n1/b", 48)


def test_own_port_reaches_the_engine_spec_from_the_agents_config():
    wrapped = config.BackendSettings(name="w", engine="vllm", model="m", own_port=False)
    assert convert.spec_from_config(wrapped).own_port is False
    assert convert.spec_from_config(config.BackendSettings(name="v", engine="vllm",
                                                           model="m")).own_port is True
