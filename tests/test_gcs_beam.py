"""Beam on gs:// against the GCS emulator: FileSystems, TFRecord IO, separate worker processes."""

import json
import subprocess
import sys
import textwrap

import apache_beam as beam
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.testing.util import assert_that, equal_to


def _write(path: str, data: bytes) -> None:
    with FileSystems.create(path) as f:
        f.write(data)


def _read(path: str) -> bytes:
    with FileSystems.open(path) as f:
        return f.read()


def _matched(pattern: str) -> list[str]:
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def test_filesystems_create_then_open_returns_the_bytes(gcs_path):
    _write(f"{gcs_path}/a.bin", b"\x00\x01 bytes")
    assert _read(f"{gcs_path}/a.bin") == b"\x00\x01 bytes"


def test_filesystems_match_single_star_stays_in_one_directory(gcs_path):
    for name in ("top-1.txt", "top-2.txt", "sub/deep-1.txt"):
        _write(f"{gcs_path}/{name}", b"x")
    assert _matched(f"{gcs_path}/top-*.txt") == [f"{gcs_path}/top-1.txt", f"{gcs_path}/top-2.txt"]


def test_filesystems_match_double_star_descends(gcs_path):
    for name in ("a.txt", "sub/b.txt", "sub/deeper/c.txt"):
        _write(f"{gcs_path}/{name}", b"x")
    assert _matched(f"{gcs_path}/**.txt") == [
        f"{gcs_path}/a.txt", f"{gcs_path}/sub/b.txt", f"{gcs_path}/sub/deeper/c.txt",
    ]  # fmt: skip


def test_filesystems_rename_moves_the_object(gcs_path):
    _write(f"{gcs_path}/old.txt", b"moved")
    FileSystems.rename([f"{gcs_path}/old.txt"], [f"{gcs_path}/new.txt"])
    assert not FileSystems.exists(f"{gcs_path}/old.txt")
    assert _read(f"{gcs_path}/new.txt") == b"moved"


def test_filesystems_delete_removes_the_object(gcs_path):
    _write(f"{gcs_path}/doomed.txt", b"x")
    FileSystems.delete([f"{gcs_path}/doomed.txt"])
    assert not FileSystems.exists(f"{gcs_path}/doomed.txt")


def test_filesystems_open_of_a_missing_object_raises(gcs_path):
    with pytest.raises(Exception, match="not found|Not Found|No such|404"):
        _read(f"{gcs_path}/missing.txt")


def test_tfrecords_written_by_a_pipeline_read_back_in_another(gcs_path):
    records = [f"record-{i}".encode() for i in range(50)]
    with beam.Pipeline() as pipeline:
        _ = (
            pipeline
            | beam.Create(records)
            | beam.io.WriteToTFRecord(f"{gcs_path}/records", file_name_suffix=".tfrecord.gz",
                                      num_shards=2)
        )  # fmt: skip
    assert len(_matched(f"{gcs_path}/records-*-of-00002.tfrecord.gz")) == 2
    with beam.Pipeline() as pipeline:
        read = pipeline | beam.io.ReadFromTFRecord(f"{gcs_path}/records-*.tfrecord.gz")
        assert_that(read, equal_to(records))


# The program a separate Python process runs: DirectRunner with workers in their own processes.
# Each element reports the process that handled it and the credentials that process found.
_MULTI_PROCESS_PROGRAM = textwrap.dedent(
    """
    import json, os, sys
    import apache_beam as beam

    def where(element):
        import google.auth
        credentials, _ = google.auth.default()
        return json.dumps({"element": element, "pid": os.getpid(),
                           "credentials": type(credentials).__name__})

    with beam.Pipeline(argv=sys.argv[2:]) as pipeline:
        _ = (pipeline | beam.Create(range(20)) | beam.Map(where)
             | beam.io.WriteToText(sys.argv[1], num_shards=2))
    print(os.getpid())
    """
)


@pytest.fixture(scope="module")
def multi_process_run(gcs_emulator, tmp_path_factory):
    program = tmp_path_factory.mktemp("program") / "multi_process.py"
    program.write_text(_MULTI_PROCESS_PROGRAM)
    output = gcs_emulator.url("multi-process/out")
    result = subprocess.run(
        [sys.executable, str(program), output,
         "--direct_running_mode", "multi_processing", "--direct_num_workers", "2"],
        env=gcs_emulator.subprocess_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [
        json.loads(line)
        for path in _matched(f"{output}-*-of-00002")
        for line in _read(path).decode().splitlines()
    ]
    return int(result.stdout.split()[-1]), lines


@pytest.mark.slow  # three Python processes import Beam: ~30 s
def test_multi_processing_workers_write_every_element_to_gcs(multi_process_run):
    _, lines = multi_process_run
    assert sorted(line["element"] for line in lines) == list(range(20))


@pytest.mark.slow  # three Python processes import Beam: ~30 s
def test_multi_processing_workers_run_in_other_processes(multi_process_run):
    main_pid, lines = multi_process_run
    assert main_pid not in {line["pid"] for line in lines}


@pytest.mark.slow  # three Python processes import Beam: ~30 s
def test_multi_processing_workers_see_anonymous_credentials(multi_process_run):
    _, lines = multi_process_run
    assert {line["credentials"] for line in lines} == {"AnonymousCredentials"}


def test_filesystems_copy_leaves_both_objects(gcs_path):
    _write(f"{gcs_path}/original.txt", b"twice")
    FileSystems.copy([f"{gcs_path}/original.txt"], [f"{gcs_path}/copy.txt"])
    assert _read(f"{gcs_path}/original.txt") == _read(f"{gcs_path}/copy.txt") == b"twice"
