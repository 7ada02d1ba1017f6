"""Profiles: the shipped default matches the config defaults; YAML files load."""

from __future__ import annotations

import pathlib

import pytest

from simulator import profiles
from simulator.config import ProfileSettings


def test_realistic_profile_is_the_config_default() -> None:
    assert profiles.default() == ProfileSettings()


def test_fast_profile_is_cheaper_with_the_same_capacity() -> None:
    fast = ProfileSettings.model_validate(profiles.load("fast"))
    assert fast.decode_base_s < ProfileSettings().decode_base_s
    assert fast.num_gpu_blocks == ProfileSettings().num_gpu_blocks


def test_yaml_profile_file_and_whole_config_file(tmp_path: pathlib.Path) -> None:
    plain = tmp_path / "p.yaml"
    plain.write_text("max_num_seqs: 4\nnum_gpu_blocks: 100\n")
    assert profiles.load(str(plain)) == {"max_num_seqs": 4, "num_gpu_blocks": 100}
    whole = tmp_path / "c.yaml"
    whole.write_text("engine: vllm\nprofile:\n  block_size: 32\n")
    assert profiles.load(str(whole)) == {"block_size": 32}


def test_unknown_profile_is_a_one_line_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(profiles.ProfileError, match="neither a built-in profile"):
        profiles.load(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(profiles.ProfileError, match="expected a mapping"):
        profiles.load(str(bad))


def test_a_repeated_key_in_a_profile_file_is_refused(tmp_path: pathlib.Path) -> None:
    """Profile files are read by the config files' loader: the second value no longer
    wins silently."""
    dup = tmp_path / "dup.yaml"
    dup.write_text("max_num_seqs: 4\nmax_num_seqs: 8\n")
    with pytest.raises(profiles.ProfileError,
                       match=r"^--profile .*dup\.yaml: line 2: duplicate key 'max_num_seqs'"):
        profiles.load(str(dup))
