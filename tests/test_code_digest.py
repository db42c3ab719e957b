"""The digest that keys the caches of code-dependent work: the package's source, nothing else."""

from __future__ import annotations

from diffprune_bench import code_digest as code_digest_module
from diffprune_bench.code_digest import code_digest


def test_the_code_digest_follows_the_package_source_only(tmp_path, monkeypatch):
    package = tmp_path / "package"
    (package / "methods").mkdir(parents=True)
    (package / "harness.py").write_text("A = 1\n")
    (package / "methods" / "rigl.py").write_text("B = 1\n")

    def digest() -> str:
        code_digest.cache_clear()
        return code_digest()

    monkeypatch.setattr(code_digest_module, "PACKAGE", package)
    try:
        before = digest()
        (package / "notes.md").write_text("a README line")
        (tmp_path / "record.json").write_text("{}")
        assert digest() == before  # files that are not the package's source
        (package / "methods" / "rigl.py").write_text("B = 2\n")
        edited = digest()
        assert edited != before
        (package / "methods" / "rigl.py").rename(package / "methods" / "magran.py")
        assert digest() not in (before, edited)  # the same bytes under another name are other code
    finally:
        code_digest.cache_clear()
