"""tf.train.Example encoding of decision-time features, shared by training and serving.

``features_to_example`` is the one place decision-time features become a tf.Example: the join
writes it (plus the label and the join's own columns, ``transforms.examples``), bulk scoring and
the product-side scorer (``loopline.scorer``) feed the same encoding to the model, so training
and serving cannot drift apart. Privacy is applied here too: dropped features never reach an
example, pseudonymised ones arrive as keyed HMAC-SHA256 hex digests. Free of Beam: a product
service that scores with ``loopline.scorer`` imports this and TensorFlow, nothing more.

    >>> key = pii_key(blueprint)                      # None when nothing is pseudonymised
    >>> key = pii_key(blueprint, "projects/p/secrets/pii-key/versions/1")  # from Secret Manager
    >>> example = features_to_example(event.features, blueprint, key)
    >>> example.features.feature["tenure_days"].int64_list.value
    [120]
    >>> serialized = features_to_examples([e.features for e in events], blueprint, key)

``features_to_examples`` is the same encoding for a batch, column by column: the values go into
an Arrow record batch and tfx_bsl's C++ encoder writes the examples, about four times faster per
row than building each proto in Python. It parses to the same tf.Example as
``features_to_example`` (the order of the features on the wire may differ). ``feature_columns``,
``list_array`` and ``encode_columns`` are its steps, for encoders of wider examples (the join's).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import tensorflow as tf
from tfx_bsl.coders.example_coder import RecordBatchToExamplesEncoder

from loopline.blueprint import Blueprint


class PiiKeyMissing(ValueError):
    """The blueprint pseudonymises identifiers but no key was provided in its environment variable."""


class PiiKeySecretError(PiiKeyMissing):
    """``--pii_key_secret`` is not a secret version name, or Secret Manager would not give it."""


# A Secret Manager secret version, as --pii_key_secret takes it (the templates' regex too).
SECRET_VERSION = re.compile(r"^projects/[^\n\r/]+/secrets/[^\n\r/]+/versions/[^\n\r/]+$")


def check_pii_key_secret(secret: str) -> None:
    """Raises ``PiiKeySecretError`` unless ``secret`` names a secret version.

    >>> check_pii_key_secret("projects/acme/secrets/loopline-pii-key/versions/latest")
    """
    if not SECRET_VERSION.fullmatch(secret):
        raise PiiKeySecretError(
            f"--pii_key_secret must name a secret version like "
            f"projects/PROJECT/secrets/SECRET/versions/VERSION, got {secret!r}"
        )


def pii_key(blueprint: Blueprint, secret: str | None = None, client: Any = None) -> bytes | None:
    """The pseudonymisation key; None when nothing is hashed.

    From the Secret Manager secret version ``secret`` when given (its payload bytes as stored,
    fetched once with ``client``, by default a ``SecretManagerServiceClient`` with the
    launcher's credentials), else from the environment variable ``blueprint.privacy.key_env``.
    Read on the launcher, once, and passed to transforms as configuration: workers never look at
    the environment or Secret Manager. The key is never logged nor part of any message.

    Raises ``PiiKeySecretError`` (a ``PiiKeyMissing``) for a malformed secret name, even when
    nothing is hashed, or a secret that cannot be read or is empty; ``PiiKeyMissing`` when the
    blueprint pseudonymises, no secret is given and the variable is unset or empty.

        >>> pii_key(blueprint, "projects/acme/secrets/loopline-pii-key/versions/3")
    """
    if secret:
        check_pii_key_secret(secret)
    privacy = blueprint.privacy
    if not privacy.pseudonymise:
        return None
    if secret:
        return _secret_key(secret, client)
    value = os.environ.get(privacy.key_env, "")
    if not value:
        raise PiiKeyMissing(
            f"blueprint {blueprint.name} v{blueprint.version} pseudonymises "
            f"{', '.join(privacy.pseudonymise)} but environment variable {privacy.key_env} "
            "is unset or empty; set it to the pseudonymisation key (or mount the secret there), "
            "or pass --pii_key_secret"
        )
    return value.encode("utf-8")


def _secret_key(secret: str, client: Any) -> bytes:
    """The payload of secret version ``secret``; PiiKeySecretError when it cannot be had."""
    from google.api_core.exceptions import GoogleAPIError
    from google.auth.exceptions import GoogleAuthError

    try:
        if client is None:
            from google.cloud import secretmanager

            client = secretmanager.SecretManagerServiceClient()
        data = client.access_secret_version(name=secret).payload.data
    except (GoogleAPIError, GoogleAuthError) as e:
        # The exception's own first line only: it names the secret and the cause, not the key.
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PiiKeySecretError(
            f"cannot read the pseudonymisation key from Secret Manager {secret} ({reason}); "
            "the launcher's service account needs roles/secretmanager.secretAccessor on it"
        ) from None
    if not data:
        raise PiiKeySecretError(f"Secret Manager {secret} holds an empty pseudonymisation key")
    return bytes(data)


def pseudonymise(value: str, key: bytes) -> str:
    """The keyed HMAC-SHA256 of ``value`` as 64 hex characters; stable for a given key.

    >>> pseudonymise("u-1", b"k") == pseudonymise("u-1", b"k") != pseudonymise("u-1", b"k2")
    True
    """
    return hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()


def features_to_example(
    features: Mapping[str, Any], blueprint: Blueprint, key: bytes | None
) -> tf.train.Example:
    """Every example feature of ``blueprint`` (dropped ones omitted, identifiers hashed), typed.

    int/int_list -> int64_list, float/float_list -> float_list, string/string_list -> bytes_list.
    Raises ``PiiKeyMissing`` if a feature must be pseudonymised and ``key`` is None, and
    ValueError naming a feature that is absent from ``features``.
    """
    example = tf.train.Example()
    add_features(example.features.feature, features, blueprint, key)
    return example


# Floats are read as doubles (as features_to_example's float()) and then rounded to float32 like
# the proto does; pyarrow refuses to read an int above 2**24 straight into float32.
_ARROW_TYPES = {
    "int": pa.list_(pa.int64()),
    "float": pa.list_(pa.float64()),
    "string": pa.list_(pa.binary()),
}
_FLOAT32_LIST = pa.list_(pa.float32())
_EXACT_TYPES = {"int": (int,), "float": (float, int), "string": (str,)}
_ENCODERS = threading.local()  # one tfx_bsl encoder per thread, made on first use


def features_to_examples(
    rows: Sequence[Mapping[str, Any]], blueprint: Blueprint, key: bytes | None
) -> list[bytes]:
    """Serialized ``features_to_example`` for many rows at once (see the module docstring).

    Strict: any row the columnar path cannot take (a missing feature, a value of the wrong type
    or out of int64 range, a missing PII key) raises for the whole batch; encode such a batch row
    by row with ``features_to_example`` to find the bad rows and their reasons.
    """
    if not rows:
        return []
    names, arrays = feature_columns(rows, blueprint, key)
    return encode_columns(names, arrays)


def feature_columns(
    rows: Sequence[Mapping[str, Any]], blueprint: Blueprint, key: bytes | None
) -> tuple[list[str], list[pa.Array]]:
    """The blueprint's example features of ``rows`` as named Arrow list columns, checked and
    pseudonymised like ``features_to_example`` does (strict, see ``features_to_examples``)."""
    names, arrays = [], []
    for name, base, is_list, hashed in _plan(blueprint):
        values = [row.get(name) for row in rows]
        lists = values if is_list else [[value] for value in values]
        if is_list and not all(type(value) is list for value in values):
            raise TypeError(f"feature {name!r}: every value must be a list")
        # features_to_example writes int(v), float(v), str(v): only values of exactly these
        # types (no bool, no subclass with its own conversion) are encoded alike here.
        exact = _EXACT_TYPES[base]
        if not all(type(v) in exact for value in lists for v in value):
            raise TypeError(f"feature {name!r}: a value is not of type {base}")
        if hashed:
            if key is None:
                raise PiiKeyMissing(f"feature {name!r} must be pseudonymised but no key was given")
            lists = [[pseudonymise(v, key) for v in value] for value in lists]
        names.append(name)
        arrays.append(list_array(lists, base, name))
    return names, arrays


def list_array(lists: list[list[Any]], base: str, name: str) -> pa.Array:
    """One column of lists of a base type (``int``, ``float``, ``string``), as the proto types
    it; ValueError naming the feature when a value is missing."""
    array = pa.array(lists, type=_ARROW_TYPES[base])
    if base == "float":
        array = array.cast(_FLOAT32_LIST, safe=False)
    if array.null_count or array.flatten().null_count:
        raise ValueError(f"feature {name!r} has a missing value")
    return array


def encode_columns(names: list[str], arrays: list[pa.Array]) -> list[bytes]:
    """Serialized tf.Examples, one per row of the named columns (tfx_bsl's encoder)."""
    encoder = getattr(_ENCODERS, "encoder", None)
    if encoder is None:
        encoder = _ENCODERS.encoder = RecordBatchToExamplesEncoder()
    return encoder.encode(pa.RecordBatch.from_arrays(arrays, names))


# Per blueprint, the encoding plan: (name, base type, is_list, pseudonymised) for each example
# feature, computed once instead of re-deriving the blueprint's properties for every row. Keyed by
# identity; the blueprint is kept in the value so that its id cannot be reused while cached.
_PLANS: dict[int, tuple[Blueprint, tuple[tuple[str, str, bool, bool], ...]]] = {}


def _plan(blueprint: Blueprint) -> tuple[tuple[str, str, bool, bool], ...]:
    cached = _PLANS.get(id(blueprint))
    if cached is not None and cached[0] is blueprint:
        return cached[1]
    hashed = blueprint.privacy.pseudonymise
    plan = tuple(
        (spec.name, spec.base_type, spec.is_list, spec.name in hashed)
        for spec in blueprint.example_features
    )
    if len(_PLANS) > 64:  # blueprints are few; never let a caller grow this without bound
        _PLANS.clear()
    _PLANS[id(blueprint)] = (blueprint, plan)
    return plan


def add_features(
    feature_map: Any, features: Mapping[str, Any], blueprint: Blueprint, key: bytes | None
) -> None:
    """Adds the blueprint's example features of ``features`` to a tf.Example's feature map
    (what ``features_to_example`` builds; the join's examples add their own columns)."""
    for name, base, is_list, hashed in _plan(blueprint):
        value = features.get(name)
        if value is None:
            spec_type = f"{base}_list" if is_list else base
            raise ValueError(f"feature {name!r} ({spec_type}) is missing from the decision")
        values = value if is_list else (value,)
        # SetInParent marks the kind even for an empty list, so readers see a typed empty value.
        if base == "int":
            ints = feature_map[name].int64_list
            ints.SetInParent()
            ints.value.extend([int(v) for v in values])
        elif base == "float":
            floats = feature_map[name].float_list
            floats.SetInParent()
            floats.value.extend([float(v) for v in values])
        else:
            if hashed:
                if key is None:
                    raise PiiKeyMissing(
                        f"feature {name!r} must be pseudonymised but no key was given; "
                        f"set {blueprint.privacy.key_env}"
                    )
                values = [pseudonymise(str(v), key) for v in values]
            strings = feature_map[name].bytes_list
            strings.SetInParent()
            strings.value.extend([str(v).encode("utf-8") for v in values])
