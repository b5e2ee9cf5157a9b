"""The training pipeline's input: the join's spans as ImportExampleGen reads them (exactly the
files each manifest lists, or a span named at run time in a compiled spec), and the checks that
the examples carry what the blueprint declares, made before any component runs.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tensorflow.core.example import example_pb2
from tfx import v1 as tfx

from loopline import storage
from loopline.blueprint import RESERVED_NAMES, Blueprint
from loopline.spans import Span

# The compiled Vertex AI spec's runtime parameter naming the span to train on (the DAG sets it).
EXAMPLES_PARAMETER = "examples"
_KIND = {"int": "int64_list", "float": "float_list", "string": "bytes_list"}


class ExampleMismatch(ValueError):
    """The examples do not carry what the blueprint declares (names or types)."""


@dataclass(frozen=True)
class ExampleSource:
    """Where ImportExampleGen reads: a base directory and one file pattern per split.

    ``input_base`` is a path, or for a compiled Vertex AI spec the runtime parameter that
    names the span at run time (see ``runtime_example_source``)."""

    input_base: str | tfx.dsl.experimental.RuntimeParameter
    spans: tuple[Span, ...]

    @property
    def input_config(self):
        return tfx.proto.Input(
            splits=[
                tfx.proto.Input.Split(name=split, pattern=f"examples/{split}/*.tfrecord.gz")
                for split in ("train", "eval")
            ]
        )


def example_source(spans: list[Span], pipeline_root: str) -> ExampleSource:
    """Where ImportExampleGen reads exactly the example files the spans' manifests list.

    One span whose split directories hold just those files is read in place; otherwise
    (several spans, or a span holding files its manifest does not list) the listed files are
    staged (symlinked) into one tree under the pipeline root, keyed by the spans and their
    listings, so one ImportExampleGen reads them all while keeping the train/eval split."""
    listed = {(i, split): manifest_files(span, split) for i, span in enumerate(spans)
              for split in ("train", "eval")}  # fmt: skip
    if len(spans) == 1 and all(
        files == spans[0].example_files(split) for (_, split), files in listed.items()
    ):
        # Read in place, local or gs:// (the daily DAG trains on the day's span in its bucket).
        return ExampleSource(spans[0].uri, tuple(spans))
    # Staging symlinks needs local spans (Span.path says so in one line for a remote one).
    listed = {key: [Path(f) for f in files] for key, files in listed.items()}
    identity = "\n".join(
        f"{spans[i].path.resolve()}|{split}|{f.name}" for (i, split), files in listed.items()
        for f in files
    )  # fmt: skip
    key = hashlib.sha256(identity.encode()).hexdigest()
    staged = Path(pipeline_root) / "staged_spans" / key[:16]
    for (i, split), files in listed.items():
        span = spans[i]
        target = staged / "examples" / split
        target.mkdir(parents=True, exist_ok=True)
        for f in files:
            link = target / f"span{i:03d}-{span.date or span.path.name}-{f.name}"
            if not link.exists():
                link.symlink_to(f.resolve())
    return ExampleSource(str(staged), tuple(spans))


def manifest_files(span: Span, split: str) -> list[str]:
    """The example files of one split that the span's manifest lists, found by name in the
    span's own directory (so a copied or moved span still reads), as paths or URIs like the
    span's. A manifest written before spans listed their files (no ``files``) falls back to
    every file of the split."""
    listed = span.manifest.get("files", {}).get(split)
    if listed is None:
        return span.example_files(split)
    return sorted(storage.join(span.uri, "examples", split, PurePosixPath(p).name) for p in listed)


def runtime_example_source(default: str) -> ExampleSource:
    """For a compiled spec: ImportExampleGen reads the span named at run time by the pipeline
    parameter ``examples`` (``default`` when the job does not set it); nothing is read now.

    >>> runtime_example_source("gs://b/data/notify/2026-11-01").input_base.name
    'examples'
    """
    parameter = tfx.dsl.experimental.RuntimeParameter(
        name=EXAMPLES_PARAMETER, ptype=str, default=default
    )
    return ExampleSource(parameter, ())


def absolute(path: str) -> str:
    """A local path made absolute (components run elsewhere); a URI such as gs://... as is."""
    return path if "://" in path else os.path.abspath(path)


def check_examples_match_blueprint(spans: list[Span], blueprint: Blueprint) -> None:
    """Fails fast, before any component runs, when the first example of a split lacks a
    blueprint feature or the label, carries a feature the blueprint does not declare, or holds
    a feature of another type (a blueprint version that does not match the data)."""
    expected = {f.name: _KIND[f.base_type] for f in blueprint.example_features}
    expected[blueprint.label.name] = _KIND[blueprint.label.type]
    for span in spans:
        for split in ("train", "eval"):
            example = _first_example(span.example_files(split))
            if example is None:
                continue
            where = f"span {span.uri} ({split})"
            present = example.features.feature
            missing = sorted(set(expected) - set(present))
            if missing:
                raise ExampleMismatch(
                    f"{where} lacks {', '.join(missing)}, declared by blueprint "
                    f"{blueprint.name} v{blueprint.version}"
                )
            extra = sorted(set(present) - set(expected) - RESERVED_NAMES)
            if extra:
                raise ExampleMismatch(
                    f"{where} carries {', '.join(extra)}, not declared by blueprint "
                    f"{blueprint.name} v{blueprint.version}"
                )
            for name, kind in expected.items():
                actual = present[name].WhichOneof("kind")
                if actual is not None and actual != kind:
                    raise ExampleMismatch(
                        f"{where}: feature {name!r} holds {actual}, but the blueprint's type "
                        f"implies {kind}"
                    )


def _first_example(files: list[str]) -> example_pb2.Example | None:
    """The first example of the first non-empty file, read by TensorFlow (through tf.io.gfile,
    so a local path or gs://), CRCs checked."""
    import tensorflow as tf

    for path in files:
        for record in tf.data.TFRecordDataset(path, compression_type="GZIP").take(1):
            return example_pb2.Example.FromString(record.numpy())
    return None


def provenance_recorded(spans: list[Span], blueprint: Blueprint) -> bool:
    """Whether every span's examples carry the columns ``label.observable_when`` names (read
    from a span's first example). Without them the trainer weighs every row as observable, and
    the gate must judge all rows: the observable slice would be missing."""
    columns = {column for column, _ in blueprint.label.observable_when}
    for span in spans:
        example = _first_example(span.example_files("eval")) or _first_example(
            span.example_files("train")
        )
        if example is not None and not columns <= set(example.features.feature):
            return False
    return True
