"""Training/serving skew (Rules of ML #37): TFDV statistics of the features seen at scoring,
compared with the statistics the model was trained on.

    joined | ServingStatistics(blueprint, key, "out/serving_stats.pb")
    report = skew_report(blueprint, load_statistics(training), load_statistics(serving))
"""

from __future__ import annotations

import apache_beam as beam

from loopline.readout import DEFAULT_MAX_SKEW_JENSEN_SHANNON, DEFAULT_MAX_SKEW_LINF
from transforms.join import JoinedDecision


class ServingStatistics(beam.PTransform):
    """TFDV statistics of the decision-time features of joined decisions, encoded exactly as
    bulk scoring feeds the model (``features_to_example``); written to ``output_path``.

    >>> join.joined | ServingStatistics(blueprint, key, "out/serving_stats.pb")
    """

    def __init__(self, blueprint, key: bytes | None, output_path: str, label: str | None = None):
        super().__init__(label)
        self._blueprint = blueprint
        self._key = key
        self._output_path = output_path

    def expand(self, joined: beam.PCollection):
        import tensorflow_data_validation as tfdv
        from tfx_bsl.public import tfxio

        from loopline.examples import features_to_example

        blueprint, key = self._blueprint, self._key

        def encode(j: JoinedDecision) -> bytes:
            return features_to_example(j.decision.features, blueprint, key).SerializeToString()

        return (
            joined
            | "EncodeFeatures" >> beam.Map(encode)
            | "ToRecordBatches"
            >> tfxio.TFExampleBeamRecord(
                physical_format="inmem", telemetry_descriptors=["loopline", "monitor"]
            ).BeamSource()
            | "GenerateStatistics" >> tfdv.GenerateStatistics(tfdv.StatsOptions())
            | "WriteStatistics" >> tfdv.WriteStatisticsToBinaryFile(self._output_path)
        )


def load_statistics(path: str):
    """A DatasetFeatureStatisticsList from a FeatureStats.pb (binary), a TFRecord of statistics,
    or a directory holding one (StatisticsGen's ``Split-train/FeatureStats.pb`` preferred)."""
    import tensorflow as tf
    import tensorflow_data_validation as tfdv

    if tf.io.gfile.isdir(path):
        found = (
            sorted(tf.io.gfile.glob(f"{path.rstrip('/')}/**/FeatureStats.pb"))
            or sorted(tf.io.gfile.glob(f"{path.rstrip('/')}/*/FeatureStats.pb"))
            or sorted(tf.io.gfile.glob(f"{path.rstrip('/')}/FeatureStats.pb"))
        )
        train = [f for f in found if "train" in f.lower()]
        if not (train or found):
            raise ValueError(f"--training_stats {path}: no FeatureStats.pb under this directory")
        path = (train or found)[0]
    try:
        return tfdv.load_stats_binary(path)
    except Exception:  # noqa: BLE001 - not a binary proto: try the TFRecord form
        return tfdv.load_statistics(path)


def _only_features(stats, names: set[str]):
    """A copy of ``stats`` holding only the features in ``names``."""
    from tensorflow_metadata.proto.v0 import statistics_pb2

    out = statistics_pb2.DatasetFeatureStatisticsList()
    for dataset in stats.datasets:
        kept = out.datasets.add()
        kept.CopyFrom(dataset)
        del kept.features[:]
        for feature in dataset.features:
            name = feature.path.step[0] if feature.path.step else feature.name
            if name in names:
                kept.features.add().CopyFrom(feature)
    return out


def skew_report(
    blueprint,
    training_stats,
    serving_stats,
    schema=None,
    max_jensen_shannon: float = DEFAULT_MAX_SKEW_JENSEN_SHANNON,
    max_linf: float = DEFAULT_MAX_SKEW_LINF,
) -> dict:
    """Per blueprint feature: the skew distance between training and serving statistics, its
    threshold, whether it is past it, and any schema anomaly of the serving data.

    Numeric features get a Jensen-Shannon divergence comparator, categorical ones an
    L-infinity distance comparator, both as skew (training vs serving) and drift (serving vs the
    training statistics as the previous span) comparators of the schema. Pseudonymised
    identifiers get none: their values are expected to differ between days.
    The schema is ``schema`` (SchemaGen's) when given, else inferred from the training
    statistics; either way it is cut down to the blueprint's example features.
    """
    import tensorflow_data_validation as tfdv
    from tensorflow_metadata.proto.v0 import schema_pb2

    names = {f.name for f in blueprint.example_features}
    training = _only_features(training_stats, names)
    serving = _only_features(serving_stats, names)
    if schema is None:
        schema = tfdv.infer_schema(training)
    kept = schema_pb2.Schema()
    kept.CopyFrom(schema)
    del kept.feature[:]
    for feature in schema.feature:
        if feature.name in names:
            kept.feature.add().CopyFrom(feature)
    types = blueprint.feature_types
    comparators = {}
    for feature in kept.feature:
        if feature.name in blueprint.privacy.pseudonymise:
            continue
        if types[feature.name].removesuffix("_list") == "string":
            comparators[feature.name] = ("L-infinity", max_linf)
            feature.skew_comparator.infinity_norm.threshold = max_linf
            feature.drift_comparator.infinity_norm.threshold = max_linf
        else:
            comparators[feature.name] = ("Jensen-Shannon", max_jensen_shannon)
            feature.skew_comparator.jensen_shannon_divergence.threshold = max_jensen_shannon
            feature.drift_comparator.jensen_shannon_divergence.threshold = max_jensen_shannon
    skew = tfdv.validate_statistics(training, kept, serving_statistics=serving)
    drift = tfdv.validate_statistics(serving, kept, previous_statistics=training)
    distances = {}
    for info in list(skew.drift_skew_info):
        for m in info.skew_measurements:
            distances[info.path.step[0]] = (float(m.value), float(m.threshold))
    anomalies: dict[str, list[str]] = {}
    for result in (drift, skew):
        for name, info in result.anomaly_info.items():
            for reason in info.reason:
                text = reason.description or reason.short_description
                if text not in anomalies.setdefault(name, []):
                    anomalies[name].append(text)
    features = []
    for spec in blueprint.example_features:
        comparator, threshold = comparators.get(spec.name, (None, None))
        distance, measured_threshold = distances.get(spec.name, (None, threshold))
        features.append(
            {
                "name": spec.name,
                "type": spec.type,
                "comparator": comparator,
                "distance": distance,
                "threshold": measured_threshold,
                "skewed": distance is not None and threshold is not None and distance > threshold,
                "anomalies": anomalies.get(spec.name, []),
            }
        )
    return {
        "features": features,
        "skewed": [f["name"] for f in features if f["skewed"]],
        "with_anomalies": [f["name"] for f in features if f["anomalies"]],
    }
