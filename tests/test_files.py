import pytest

from projected_grpo.files import write_directory_atomically


def test_directory_appears_whole_and_a_second_builder_loses_the_race_quietly(tmp_path):
    target = tmp_path / "cache" / "thing"
    write_directory_atomically(target, lambda d: (d / "a.txt").write_text("first"))
    write_directory_atomically(target, lambda d: (d / "a.txt").write_text("second"))  # built concurrently
    assert (target / "a.txt").read_text() == "first"

    def broken(d):
        (d / "half.txt").write_text("x")
        raise RuntimeError("crashed mid-build")

    with pytest.raises(RuntimeError, match="mid-build"):
        write_directory_atomically(tmp_path / "other", broken)
    assert not (tmp_path / "other").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
