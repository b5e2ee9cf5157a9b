"""Span files (transforms/span_files.py): TFRecord framing TensorFlow writes and reads."""

import gzip

import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from transforms.span_files import JSON_LINES, TFRECORD_GZIP, open_span_file, tfrecord_frame


@settings(max_examples=50, deadline=None)
@given(records=st.lists(st.binary(max_size=300), max_size=5))
def test_framing_is_byte_for_byte_what_tensorflow_writes(tmp_path_factory, records):
    path = tmp_path_factory.mktemp("tf") / "reference.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    assert b"".join(tfrecord_frame(r) for r in records) == path.read_bytes()


def test_gzip_tfrecord_file_reads_back_with_tensorflow_and_counts_its_records(tmp_path):
    records = [f"example {i}".encode() * (i + 1) for i in range(2000)]
    path = str(tmp_path / "part.tfrecord.gz")
    with open_span_file(path, TFRECORD_GZIP) as f:
        f.write_all(records)
    assert f.records == 2000
    dataset = tf.data.TFRecordDataset([path], compression_type="GZIP")
    assert [r.numpy() for r in dataset] == records


def test_json_lines_file_holds_one_record_per_line(tmp_path):
    path = tmp_path / "part.jsonl"
    with open_span_file(str(path), JSON_LINES) as f:
        f.write_all(['{"a":1}', '{"b":"é"}'])
    assert path.read_text(encoding="utf-8").splitlines() == ['{"a":1}', '{"b":"é"}']
    assert f.records == 2


def test_an_empty_gzip_tfrecord_file_is_valid_and_holds_no_record(tmp_path):
    path = str(tmp_path / "empty.tfrecord.gz")
    open_span_file(path, TFRECORD_GZIP).close()
    with gzip.open(path) as f:
        assert f.read() == b""
    assert list(tf.data.TFRecordDataset([path], compression_type="GZIP")) == []
