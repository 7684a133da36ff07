"""The release's identity: one version source, shown by the command, and typed packages."""

from __future__ import annotations

from importlib import metadata, resources

import pytest

import protofuse
from protofuse_cli.main import main


def test_the_installed_version_is_protofuse_version():
    assert metadata.version("protofuse") == protofuse.__version__


def test_the_command_prints_the_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"protofuse {protofuse.__version__}"


@pytest.mark.parametrize(
    "package", ["protofuse", "client_sdk", "protofuse_server", "protofuse_cli"]
)
def test_every_package_declares_its_type_hints(package):
    assert resources.files(package).joinpath("py.typed").is_file()
