"""The TFX module file: preprocessing and training derived from the blueprint.

Transform calls ``preprocessing_fn`` and Trainer calls ``run_fn``; both receive the blueprint's
features, label and ``model`` section as ``custom_config`` (built by ``pipelines.train``), so this
file holds no per-decision-type code. Preprocessing by feature type:

- ``int`` / ``float``: z-score;
- ``string``: vocabulary ids (top-k plus one out-of-vocabulary bucket), one-hot in the model;
- ``string_list``: vocabulary ids per element, a multi-hot bag in the model;
- ``int_list`` / ``float_list``: the mean and the length of the list, each z-scored;
- pseudonymised identifiers (high-cardinality HMAC strings): hashed into buckets, not a vocabulary.

The blueprint's ``model.encodings`` overrides that for a numeric feature whose number is not a
quantity a z-score serves (``ENCODINGS``): ``categorical`` gives each value its own id, like a
string (an hour of the day: the night and the evening differ, noon is not "between" them);
``log`` z-scores ``log1p`` of a non-negative, heavy-tailed count (tenure in days: the first
month differs, year 3 and year 4 do not), and of a list's mean.

Training is treatment-aware. Transform also writes each row's sample weight (``SAMPLE_WEIGHT``)
from its decision provenance, never a model input: 0 where the label was not observable
(``label.observable_when``; for notify, a notification that was not sent), otherwise the
inverse of the logging policy's propensity capped at ``label.ips_clip`` (1 without a
propensity), so that the rows the logging policy rarely chose count for all those it did not.
Unobservable rows stay in the data (the Evaluator and monitoring see every row) but weigh 0 in
the loss rather than being filtered out of the input: one input path and one place (Transform)
that decides a row's weight, where a test can read it; with Adam, a batch's share of weight-0
rows scales its gradient but not the step.

The pushed model's ``serving_default`` takes serialized raw ``tf.Example`` (as written by
``loopline.examples.features_to_example``) and applies the Transform graph itself, so scoring
never re-implements preprocessing:

    serving_default(examples: tf.string[None]) -> {"score": tf.float32[None]}
"""

from __future__ import annotations

import os

# TFX 1.16 and TFT expect Keras 2 (tf_keras); set before TensorFlow first resolves tf.keras.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tensorflow as tf  # noqa: E402
import tensorflow_transform as tft  # noqa: E402
import tf_keras as keras  # noqa: E402
from tfx_bsl.public import tfxio  # noqa: E402

NUMERIC = "numeric"
CATEGORICAL = "categorical"
# The transformed column holding each row's weight in the loss (see the module docstring).
SAMPLE_WEIGHT = "__sample_weight"

# How a numeric feature may reach the model besides the default z-score (see the docstring).
ENCODINGS = ("zscore", "log", "categorical")

DEFAULT_MODEL = {
    "hidden_units": [32, 16],
    "epochs": 5,
    "batch_size": 128,
    "learning_rate": 0.003,
    # L2 penalty on the hidden layers' weights: a span of a few thousand labelled rows meets
    # a one-hot input of a thousand hashed ids, which an unpenalised network memorises.
    "l2": 0.001,
    # Enough buckets that a few hundred pseudonymised ids rarely share one (100 buckets for 200
    # users put most of them in a shared bucket, blurring each user's own rate).
    "hash_buckets": 1000,
    "vocab_top_k": 1000,
    "encodings": {},
}


def model_settings(custom_config: dict) -> dict:
    """The blueprint's ``model`` section over the defaults; a ValueError names a bad encoding."""
    settings = dict(DEFAULT_MODEL)
    settings.update({k: v for k, v in (custom_config.get("model") or {}).items() if v is not None})
    types = {f["name"]: f["type"] for f in custom_config.get("features", ())}
    for name, encoding in dict(settings["encodings"]).items():
        if encoding not in ENCODINGS:
            raise ValueError(
                f"model.encodings.{name}: {encoding!r} is not one of {', '.join(ENCODINGS)}"
            )
        ftype = types.get(name)
        if ftype is None or ftype.startswith("string"):
            raise ValueError(f"model.encodings.{name}: not a numeric feature of the blueprint")
        if encoding == "categorical" and not ftype.startswith("int"):
            raise ValueError(f"model.encodings.{name}: only int features can be categorical")
    return settings


def _encoding(settings: dict, name: str) -> str:
    return dict(settings["encodings"]).get(name, "zscore")


def transformed_features(custom_config: dict) -> dict[str, tuple[str, str | None]]:
    """Every transformed feature the model reads: name -> (NUMERIC or CATEGORICAL, vocabulary).

    The vocabulary is the name of a Transform vocabulary file, or None for hashed identifiers.

    >>> transformed_features({"features": [{"name": "country", "type": "string"}], "hashed": []})
    {'country': ('categorical', 'country_vocab')}
    """
    hashed = set(custom_config.get("hashed", ()))
    settings = model_settings(custom_config)
    plan: dict[str, tuple[str, str | None]] = {}
    for feature in custom_config["features"]:
        name, ftype = feature["name"], feature["type"]
        if _encoding(settings, name) == "categorical":
            plan[name] = (CATEGORICAL, f"{name}_vocab")
        elif ftype in ("int", "float"):
            plan[name] = (NUMERIC, None)
        elif ftype in ("int_list", "float_list"):
            plan[f"{name}__mean"] = (NUMERIC, None)
            plan[f"{name}__len"] = (NUMERIC, None)
        elif ftype in ("string", "string_list"):
            plan[name] = (CATEGORICAL, None if name in hashed else f"{name}_vocab")
        else:
            raise ValueError(f"feature {name!r} has an unknown type {ftype!r}")
    return plan


def preprocessing_fn(inputs: dict, custom_config: dict) -> dict:
    """Transform's preprocessing, derived from the blueprint's feature types."""
    settings = model_settings(custom_config)
    hashed = set(custom_config.get("hashed", ()))
    outputs = {}
    for feature in custom_config["features"]:
        name, ftype = feature["name"], feature["type"]
        x = inputs[name]
        encoding = _encoding(settings, name)
        if encoding == "categorical":  # each value its own id: int_list -> a bag of ids
            ids = _scalar(x, 0, tf.int64) if ftype == "int" else _sparse(x)
            strings = (
                tf.strings.as_string(ids)
                if ftype == "int"
                else tf.sparse.map_values(tf.strings.as_string, ids)
            )
            outputs[name] = tft.compute_and_apply_vocabulary(
                strings,
                top_k=settings["vocab_top_k"],
                num_oov_buckets=1,
                vocab_filename=f"{name}_vocab",
            )
        elif ftype in ("int", "float"):
            outputs[name] = tft.scale_to_z_score(_scaled(_scalar(x, 0, tf.float32), encoding))
        elif ftype in ("int_list", "float_list"):
            values = tf.sparse.map_values(tf.cast, _sparse(x), tf.float32)
            total = tf.sparse.reduce_sum(values, axis=1, keepdims=True)
            length = tf.cast(
                tf.sparse.reduce_sum(
                    tf.sparse.map_values(tf.ones_like, values), axis=1, keepdims=True
                ),
                tf.float32,
            )
            outputs[f"{name}__mean"] = tft.scale_to_z_score(
                _scaled(tf.reshape(tf.math.divide_no_nan(total, length), [-1, 1]), encoding)
            )
            outputs[f"{name}__len"] = tft.scale_to_z_score(tf.reshape(length, [-1, 1]))
        else:  # string, string_list
            strings = _scalar(x, b"", tf.string) if ftype == "string" else _sparse(x)
            if name in hashed:
                outputs[name] = tft.hash_strings(strings, settings["hash_buckets"])
            else:
                outputs[name] = tft.compute_and_apply_vocabulary(
                    strings,
                    top_k=settings["vocab_top_k"],
                    num_oov_buckets=1,
                    vocab_filename=f"{name}_vocab",
                )
    label = custom_config["label"]["name"]
    if label in inputs:  # absent at serving: Transform prunes what depends on it
        outputs[label] = _scalar(inputs[label], 0, tf.float32)
        outputs[SAMPLE_WEIGHT] = sample_weight(inputs, custom_config["label"], outputs[label])
    return outputs


def sample_weight(inputs: dict, label_config: dict, like: tf.Tensor) -> tf.Tensor:
    """Each row's weight in the loss, [batch, 1] float32 shaped ``like``: 0 when the label was
    not observable, else min(1 / propensity, ips_clip), or 1 when the row has no propensity
    (absent, or -1.0: the decision did not carry one).

    A row missing a column ``observable_when`` names altogether (a span written before the join
    recorded provenance) weighs 1, as it did before: nothing says whether its label was
    observable, nor what selected it. An explicit absent value (-1, b"") is not observable
    unless listed (loopline.blueprint.Label.is_observable)."""
    observable = tf.ones_like(like, dtype=tf.bool)
    unrecorded = tf.zeros_like(like, dtype=tf.bool)
    for column, values in (label_config.get("observable_when") or {}).items():
        if column not in inputs:  # a curated schema without the column
            unrecorded = tf.ones_like(unrecorded)
            continue
        present, value = _optional_scalar(inputs[column])
        allowed = tf.constant(values, dtype=value.dtype)
        listed = tf.reduce_any(tf.equal(value, allowed[tf.newaxis, :]), axis=1, keepdims=True)
        unrecorded = tf.logical_or(unrecorded, tf.logical_not(present))
        observable = tf.logical_and(observable, tf.logical_or(tf.logical_not(present), listed))
    weight = tf.cast(observable, tf.float32)
    if "propensity" in inputs:
        present, propensity = _optional_scalar(inputs["propensity"])
        propensity = tf.cast(propensity, tf.float32)
        known = tf.logical_and(tf.logical_and(present, propensity > 0), tf.logical_not(unrecorded))
        inverse = 1.0 / tf.where(known, propensity, tf.ones_like(propensity))
        clip = float(label_config.get("ips_clip", 10.0))
        weight *= tf.where(known, tf.minimum(inverse, clip), tf.ones_like(inverse))
    return weight


def _scaled(x: tf.Tensor, encoding: str) -> tf.Tensor:
    """``x`` before its z-score: ``log1p`` of its non-negative part for ``log``, else as is."""
    return tf.math.log1p(tf.maximum(x, 0.0)) if encoding == "log" else x


def _optional_scalar(x) -> tuple[tf.Tensor, tf.Tensor]:
    """(present, value), both [batch, 1], from a scalar feature that a row may lack."""
    if isinstance(x, tf.SparseTensor):
        rows = x.dense_shape[0]
        counts = tf.math.unsorted_segment_sum(
            tf.ones_like(x.indices[:, 0]), x.indices[:, 0], num_segments=rows
        )
        default = b"" if x.dtype == tf.string else tf.zeros([], x.dtype)
        value = tf.sparse.to_dense(
            tf.SparseTensor(x.indices, x.values, tf.stack([rows, 1])), default_value=default
        )
        return tf.reshape(counts > 0, [-1, 1]), value
    value = tf.reshape(x, [-1, 1])
    return tf.ones_like(value, dtype=tf.bool), value


def _scalar(x, default, dtype) -> tf.Tensor:
    """A [batch, 1] dense tensor from a scalar feature, whether the schema made it dense or not."""
    if isinstance(x, tf.SparseTensor):
        x = tft.sparse_tensor_to_dense_with_shape(x, [None, 1], default_value=default)
    return tf.reshape(tf.cast(x, dtype) if x.dtype != dtype else x, [-1, 1])


def _sparse(x):
    """A SparseTensor from a list feature (dense when a curated schema fixed its length)."""
    return x if isinstance(x, tf.SparseTensor) else tf.sparse.from_dense(x)


def _vocabulary_sizes(plan: dict, tf_transform_output, custom_config: dict) -> dict[str, int]:
    """How many ids each categorical feature can take (the out-of-vocabulary bucket included)."""
    buckets = model_settings(custom_config)["hash_buckets"]
    sizes = {}
    for name, (kind, vocab) in plan.items():
        if kind == CATEGORICAL:
            sizes[name] = (
                buckets if vocab is None else tf_transform_output.vocabulary_size_by_name(vocab) + 1
            )
    return sizes


def build_model(custom_config: dict, tf_transform_output) -> keras.Model:
    """A feed-forward network over the transformed features, shaped by the blueprint's ``model``."""
    settings = model_settings(custom_config)
    plan = transformed_features(custom_config)
    sizes = _vocabulary_sizes(plan, tf_transform_output, custom_config)
    spec = tf_transform_output.transformed_feature_spec()
    inputs, encoded = {}, []
    for name, (kind, _) in plan.items():
        sparse = isinstance(spec[name], tf.io.VarLenFeature)
        if kind == NUMERIC:
            inputs[name] = keras.Input(shape=(1,), name=name, dtype=tf.float32)
            encoded.append(inputs[name])
        else:
            inputs[name] = keras.Input(
                shape=(None,) if sparse else (1,), name=name, dtype=tf.int64, sparse=sparse
            )
            encoded.append(
                keras.layers.CategoryEncoding(
                    num_tokens=max(sizes[name], 1), output_mode="multi_hot", name=f"{name}_bag"
                )(inputs[name])
            )
    x = keras.layers.concatenate(encoded) if len(encoded) > 1 else encoded[0]
    penalty = float(settings["l2"])
    for i, units in enumerate(settings["hidden_units"]):
        x = keras.layers.Dense(
            int(units),
            activation="relu",
            kernel_regularizer=keras.regularizers.l2(penalty) if penalty > 0 else None,
            name=f"hidden_{i}",
        )(x)
    binary = custom_config["label"]["type"] == "int"
    output = keras.layers.Dense(1, activation="sigmoid" if binary else None, name="score")(x)
    model = keras.Model(inputs=inputs, outputs=output)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=float(settings["learning_rate"])),
        loss="binary_crossentropy" if binary else "mean_squared_error",
        # Weighted like the loss: the AUC of the rows whose label is observable.
        weighted_metrics=[keras.metrics.AUC(name="auc")]
        if binary
        else [keras.metrics.RootMeanSquaredError()],
    )
    return model


def _dataset(file_pattern, data_accessor, tf_transform_output, label: str, batch_size: int):
    """Batches of (features, label, sample weight) from the transformed examples."""
    dataset = data_accessor.tf_dataset_factory(
        file_pattern,
        tfxio.TensorFlowDatasetOptions(
            batch_size=batch_size, label_key=label, num_epochs=1, shuffle=True, shuffle_seed=7
        ),
        tf_transform_output.transformed_metadata.schema,
    )
    return dataset.map(with_sample_weight)


def with_sample_weight(features: dict, label: tf.Tensor):
    """(features, label) -> (features without the weight, label, weight [batch]): the weight
    goes to Keras as the sample weight, never to the model as an input."""
    features = dict(features)
    weight = tf.reshape(features.pop(SAMPLE_WEIGHT), [-1])
    return features, label, weight


def serving_signature(model: keras.Model, tf_transform_output, custom_config: dict):
    """``serving_default``: serialized raw tf.Examples in, ``score`` out, Transform applied inside.

    Only the blueprint's example features are parsed: the label and the join's columns
    (decision_id, join_status, ...) are not needed at serving.
    """
    model.tft_layer = tf_transform_output.transform_features_layer()
    names = {f["name"] for f in custom_config["features"]}
    raw_spec = {k: v for k, v in tf_transform_output.raw_feature_spec().items() if k in names}
    input_names = list(model.input_names)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def serve(examples):
        raw = tf.io.parse_example(examples, raw_spec)
        transformed = model.tft_layer(raw)
        score = model({k: transformed[k] for k in input_names})
        return {"score": tf.reshape(tf.cast(score, tf.float32), [-1])}

    return serve


def run_fn(fn_args) -> None:
    """Trainer's entry point: fit on the transformed train split, save with the serving signature."""
    custom_config = fn_args.custom_config
    settings = model_settings(custom_config)
    label = custom_config["label"]["name"]
    tf_transform_output = tft.TFTransformOutput(fn_args.transform_output)
    keras.utils.set_random_seed(int(settings.get("seed", 7)))
    batch_size = int(settings["batch_size"])
    train = _dataset(
        fn_args.train_files, fn_args.data_accessor, tf_transform_output, label, batch_size
    )
    model = build_model(custom_config, tf_transform_output)
    # No validation_data: the Evaluator measures the eval split (sliced, against the baseline),
    # and tracing a second Keras function costs more than this whole fit on small spans.
    model.fit(train, epochs=int(settings["epochs"]), verbose=2)
    signatures = {"serving_default": serving_signature(model, tf_transform_output, custom_config)}
    model.save(fn_args.serving_model_dir, save_format="tf", signatures=signatures)
