"""Tests of sink credentials read from files (mounted Secrets)."""

from pathlib import Path

import pytest
from pydantic import SecretStr

from siem.config import ElasticsearchSinkSpec
from siem.secrets import read_secret, secret_file_problems


def test_inline_wins_and_files_are_stripped(tmp_path: Path) -> None:
    """An inline value is used as is; a file's content loses surrounding whitespace."""
    (tmp_path / "key").write_text("  abc:def \n")
    assert read_secret(SecretStr("inline"), None) == "inline"
    assert read_secret(None, tmp_path / "key") == "abc:def"
    assert read_secret(None, None) is None


def test_problems_name_the_key_and_the_file(tmp_path: Path) -> None:
    """A missing or empty secret file is reported under its key, for egressgw check."""
    (tmp_path / "empty").write_text("\n")
    spec = ElasticsearchSinkSpec(
        type="elasticsearch",
        hosts=["https://es.example:9200"],
        username="egressgw",
        password_file=tmp_path / "empty",
    )
    assert secret_file_problems(spec) == [
        ("password_file", f"{tmp_path / 'empty'}: the secret file is empty")
    ]
    spec = ElasticsearchSinkSpec(
        type="elasticsearch", hosts=["https://es.example:9200"], api_key_file=tmp_path / "none"
    )
    [(key, problem)] = secret_file_problems(spec)
    assert key == "api_key_file" and problem.startswith(f"cannot read {tmp_path / 'none'}")


def test_elasticsearch_credentials_go_together() -> None:
    """A password file needs a username; an API key file excludes username/password."""
    with pytest.raises(ValueError, match="username and password"):
        ElasticsearchSinkSpec(type="elasticsearch", hosts=["https://es"], password_file=Path("/p"))
    with pytest.raises(ValueError, match="api_key or username"):
        ElasticsearchSinkSpec(
            type="elasticsearch",
            hosts=["https://es"],
            api_key_file=Path("/k"),
            username="u",
            password=SecretStr("p"),
        )
