"""An empty admin token file is said, naming the file, instead of sending no key (the
server would answer only that the admin key is missing)."""

from __future__ import annotations

import pathlib

from tests.controlplane import ctl_testing


def test_an_empty_token_file_is_named(tmp_path: pathlib.Path) -> None:
    empty = tmp_path / "admin-token"
    empty.write_text("\n")
    for argv, env in ((["--token-file", str(empty)], {}),
                      ([], {"SYNAPSE_ADMIN_TOKEN_FILE": str(empty)})):
        code, _, err = ctl_testing.run(["get", "nodes", "--server", "127.0.0.1:1", *argv], env)
        assert code == 2, err
        assert f"token file {empty} is empty" in err
