"""loopline.storage: one way to read and write any path, shown on local files and on gs://."""

import pytest

from loopline import storage
from tests.fake_gcs import activate, root_for


@pytest.fixture(params=["local", "gs"])
def storage_root(request, tmp_path, monkeypatch):
    return root_for(request.param, tmp_path, monkeypatch)


def test_json_written_is_read_back(storage_root):
    path = storage_root / "serving/notify/aliases.json"
    storage.write_json(path, {"production": None, "history": []})
    assert storage.read_json(path) == {"production": None, "history": []}
    assert (storage_root.local / "serving/notify/aliases.json").is_file()


def test_replacing_leaves_no_temporary_file(storage_root):
    path = storage_root / "a/doc.json"
    storage.write_json(path, 1)
    storage.write_json(path, 2)
    assert storage.read_json(path) == 2
    assert [p.name for p in (storage_root.local / "a").iterdir()] == ["doc.json"]


def test_exists_is_for_files_and_is_dir_for_directories(storage_root):
    storage.write_text(storage_root / "d/e/f.txt", "x")
    assert storage.exists(storage_root / "d/e/f.txt")
    assert not storage.exists(storage_root / "d/e/g.txt")
    assert storage.is_dir(storage_root / "d") and storage.is_dir(storage_root / "d/e")
    assert not storage.is_dir(storage_root / "d/e/f") and not storage.is_dir(storage_root / "x")


def test_glob_star_stops_at_a_separator_and_double_star_crosses_it(storage_root):
    for name in ("s/2026-11-01/manifest.json", "s/2026-11-02/examples/x.gz", "s/top.json"):
        storage.write_text(storage_root / name, "{}")
    assert storage.glob(storage_root / "s/*/manifest.json") == [
        storage_root / "s/2026-11-01/manifest.json"
    ]
    assert storage.glob(storage_root / "s/*.json") == [storage_root / "s/top.json"]
    assert len(storage.glob(storage_root / "s/**")) == 3


def test_compressed_reads_decompress_by_extension(storage_root):
    import gzip

    (storage_root.local / "x.gz").write_bytes(gzip.compress(b"hello"))
    with storage.open_read(storage_root / "x.gz", compressed=True) as f:
        assert f.read(16) == b"hello"
    assert storage.read_bytes(storage_root / "x.gz") == gzip.compress(b"hello")


def test_missing_file_is_an_error_naming_it(storage_root):
    with pytest.raises(storage.StorageError, match="cannot read .*nothing.json"):
        storage.read_json(storage_root / "nothing.json")


def test_a_file_that_is_not_json_is_an_error_naming_it(storage_root):
    storage.write_text(storage_root / "bad.json", "{not json")
    with pytest.raises(storage.StorageError, match="bad.json is not readable JSON"):
        storage.read_json(storage_root / "bad.json")


def test_delete_removes_a_file_and_ignores_a_missing_one(storage_root):
    storage.write_text(storage_root / "f.txt", "x")
    storage.delete(storage_root / "f.txt")
    storage.delete(storage_root / "f.txt")
    assert not storage.exists(storage_root / "f.txt")


def test_replace_if_unchanged_writes_when_nobody_else_did(storage_root):
    path = storage_root / "aliases.json"
    storage.replace_if_unchanged(path, None, b"1")  # None: there was no file
    storage.replace_if_unchanged(path, b"1", b"2")
    assert storage.read_bytes(path) == b"2"


def test_replace_if_unchanged_refuses_after_a_concurrent_write(storage_root):
    path = storage_root / "aliases.json"
    storage.write_bytes(path, b"read by us")
    storage.write_bytes(path, b"written by another writer")
    with pytest.raises(storage.ConcurrentUpdate, match="changed by another writer"):
        storage.replace_if_unchanged(path, b"read by us", b"ours")
    assert storage.read_bytes(path) == b"written by another writer"


def test_replace_if_unchanged_refuses_when_the_file_appeared(storage_root):
    path = storage_root / "aliases.json"
    storage.write_bytes(path, b"someone created it")
    with pytest.raises(storage.ConcurrentUpdate):
        storage.replace_if_unchanged(path, None, b"ours")


def test_gs_paths_go_to_the_fake_not_to_the_real_gcs(tmp_path, monkeypatch):
    activate(monkeypatch, tmp_path)
    storage.write_text("gs://b/x.txt", "hi")
    assert (tmp_path / "b" / "x.txt").read_text() == "hi"


def test_an_unknown_scheme_is_an_error_naming_the_path():
    with pytest.raises(storage.StorageError, match="nosuchscheme://b/x"):
        storage.read_bytes("nosuchscheme://b/x")


LOCAL_PATTERNS = [
    "s/*.json",
    "s/*/manifest.json",
    "s/**",
    "s/**.json",
    "s/2026-11-0?/manifest.json",
    "s/2026-11-0[12]/*",
    "s/2026-11-0[!1]/*",
    "s/",
    "s/top.json",
    "s/missing.json",
    "nowhere/*",
]


@pytest.mark.parametrize("pattern", LOCAL_PATTERNS)
def test_a_local_glob_matches_what_beams_local_filesystem_matches(tmp_path, pattern):
    """Local paths are listed without importing Beam (a product service's scorer reads its
    registry so); what they match is what Beam's FileSystems.match matches, hidden files too."""
    from apache_beam.io.filesystems import FileSystems

    for name in ("s/2026-11-01/manifest.json", "s/2026-11-02/x.gz", "s/top.json", "s/.hid.json"):
        storage.write_text(str(tmp_path / name), "{}")
    storage.write_text(str(tmp_path / "s/.temp-run/examples/y.gz"), "{}")
    full = str(tmp_path / pattern)
    beams = sorted(m.path for m in FileSystems.match([full])[0].metadata_list)
    assert storage.glob(full) == beams
    first = storage.glob(full, limit=1)
    assert len(first) == min(1, len(beams)) and set(first) <= set(beams)
