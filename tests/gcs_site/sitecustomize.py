"""Test-only: Python processes started by the GCS tests use anonymous Google credentials.

tests/gcs_emulator.py puts this directory on PYTHONPATH of the processes it starts (pipelines,
and through them the DirectRunner's worker processes). Without credentials Beam retries
`google.auth.default` for 20-26 s before it connects anonymously; with a fake service account
every call fails at token refresh. The GCS emulator wants no credentials at all. It acts only
where `STORAGE_EMULATOR_HOST` is set, so nothing else is affected.
"""

import contextlib
import os

PROJECT = "loopline-test"


def use_anonymous_credentials():
    """Makes `google.auth.default` return anonymous credentials; returns the function it replaced."""
    import google.auth
    import google.auth._default
    from google.auth.credentials import AnonymousCredentials

    replaced = google.auth.default

    def anonymous_default(scopes=None, request=None, quota_project_id=None, default_scopes=None):
        return AnonymousCredentials(), PROJECT

    google.auth.default = google.auth._default.default = anonymous_default
    return replaced


def restore_credentials(replaced):
    import google.auth
    import google.auth._default

    google.auth.default = google.auth._default.default = replaced


if os.environ.get("STORAGE_EMULATOR_HOST"):
    with contextlib.suppress(ImportError):  # a Python without google-auth needs nothing
        use_anonymous_credentials()
