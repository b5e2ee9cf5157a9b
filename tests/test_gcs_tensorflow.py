"""TensorFlow on gs:// against the GCS emulator, through the fixture's TLS-terminating proxy.

TensorFlow's built-in GCS filesystem is the one production uses; it cannot be pointed at an
endpoint, so these tests are what proves tests/gcs_server.py's proxy carries it.
"""

import numpy as np
import tensorflow as tf
from apache_beam.io.filesystems import FileSystems


def test_gfile_write_then_read_returns_the_text(gcs_path):
    with tf.io.gfile.GFile(f"{gcs_path}/note.txt", "w") as f:
        f.write("written by TensorFlow")
    with tf.io.gfile.GFile(f"{gcs_path}/note.txt") as f:
        assert f.read() == "written by TensorFlow"


def test_gfile_reads_an_object_larger_than_its_read_block(gcs_path):
    """GCS_READ_CACHE_BLOCK_SIZE_MB=1: three blocks and a tail."""
    data = np.random.default_rng(0).bytes(3 * 1024 * 1024 + 17)
    with tf.io.gfile.GFile(f"{gcs_path}/big.bin", "wb") as f:
        f.write(data)
    with tf.io.gfile.GFile(f"{gcs_path}/big.bin", "rb") as f:
        assert f.read() == data


def test_gfile_sees_what_beam_wrote(gcs_path):
    with FileSystems.create(f"{gcs_path}/from-beam.txt") as f:
        f.write(b"one store")
    assert tf.io.gfile.exists(f"{gcs_path}/from-beam.txt")
    assert tf.io.gfile.GFile(f"{gcs_path}/from-beam.txt").read() == "one store"


def test_gfile_exists_is_false_right_after_a_delete(gcs_path):
    """GCS_STAT_CACHE_MAX_AGE=0: no stale stat from TensorFlow's cache."""
    with tf.io.gfile.GFile(f"{gcs_path}/gone.txt", "w") as f:
        f.write("x")
    assert tf.io.gfile.exists(f"{gcs_path}/gone.txt")
    tf.io.gfile.remove(f"{gcs_path}/gone.txt")
    assert not tf.io.gfile.exists(f"{gcs_path}/gone.txt")


def test_gfile_listdir_lists_files_and_subdirectories(gcs_path):
    for name in ("a.txt", "b.txt", "sub/c.txt"):
        with tf.io.gfile.GFile(f"{gcs_path}/{name}", "w") as f:
            f.write(name)
    assert sorted(tf.io.gfile.listdir(gcs_path)) == ["a.txt", "b.txt", "sub/"]


def test_gfile_makedirs_makes_a_directory(gcs_path):
    """A directory marker is an empty-bodied upload, which the emulator needed a fix for."""
    tf.io.gfile.makedirs(f"{gcs_path}/made/here")
    assert tf.io.gfile.isdir(f"{gcs_path}/made/here")


def test_tfrecord_dataset_reads_records_beam_wrote(gcs_path):
    import apache_beam as beam

    records = [f"example-{i}".encode() for i in range(30)]
    with beam.Pipeline() as pipeline:
        _ = (
            pipeline
            | beam.Create(records)
            | beam.io.WriteToTFRecord(f"{gcs_path}/part", file_name_suffix=".gz", num_shards=2)
        )
    files = tf.io.gfile.glob(f"{gcs_path}/part-*.gz")
    assert len(files) == 2
    dataset = tf.data.TFRecordDataset(files, compression_type="GZIP")
    assert sorted(r.numpy() for r in dataset) == sorted(records)


class _Doubler(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
    def __call__(self, x):
        return 2.0 * x


def test_saved_model_saved_to_gcs_loads_and_serves(gcs_path):
    tf.saved_model.save(_Doubler(), f"{gcs_path}/model/1")
    assert tf.io.gfile.exists(f"{gcs_path}/model/1/saved_model.pb")
    loaded = tf.saved_model.load(f"{gcs_path}/model/1")
    assert loaded(tf.constant([1.0, 2.5])).numpy().tolist() == [2.0, 5.0]


def test_gfile_rename_moves_the_object(gcs_path):
    with tf.io.gfile.GFile(f"{gcs_path}/before.txt", "w") as f:
        f.write("renamed")
    tf.io.gfile.rename(f"{gcs_path}/before.txt", f"{gcs_path}/after.txt")
    assert not tf.io.gfile.exists(f"{gcs_path}/before.txt")
    assert tf.io.gfile.GFile(f"{gcs_path}/after.txt").read() == "renamed"


def test_tfx_fileio_lists_and_reads_what_tensorflow_wrote(gcs_path):
    """TFX's own file layer (ExampleGen, Pusher) goes through the same filesystem."""
    from tfx.dsl.io import fileio

    with tf.io.gfile.GFile(f"{gcs_path}/artifact/data.txt", "w") as f:
        f.write("artifact")
    assert fileio.exists(f"{gcs_path}/artifact/data.txt")
    assert fileio.glob(f"{gcs_path}/artifact/*.txt") == [f"{gcs_path}/artifact/data.txt"]
    with fileio.open(f"{gcs_path}/artifact/data.txt") as f:
        assert f.read() == "artifact"
