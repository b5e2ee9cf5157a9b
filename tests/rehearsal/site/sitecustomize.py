"""Rehearsal only: the Google Cloud a job process sees is the emulated one.

tests/rehearsal/launchers.py puts this directory first on the ``PYTHONPATH`` of every job it
starts (and through it the DirectRunner's worker processes, which inherit the environment):

- ``STORAGE_EMULATOR_HOST`` set: ``google.auth.default`` returns anonymous credentials, so Beam
  and google-cloud-storage talk to the GCS emulator at once (without credentials Beam retries
  the metadata server for 20-26 s first);
- ``LOOPLINE_REHEARSAL_SECRETS`` set (a JSON object, secret version name -> value): Secret
  Manager's ``access_secret_version`` answers from it, so a job launched with
  ``--pii_key_secret`` reads its key as on Dataflow, without a Secret Manager to call.

Nothing happens in a process where neither variable is set.
"""

import contextlib
import importlib.abc
import importlib.util
import json
import os
import sys
from types import SimpleNamespace

PROJECT = "loopline-rehearsal"
SECRET_MANAGER_CLIENT = "google.cloud.secretmanager_v1.services.secret_manager_service.client"


def _anonymous_credentials() -> None:
    import google.auth
    import google.auth._default
    from google.auth.credentials import AnonymousCredentials

    def anonymous_default(scopes=None, request=None, quota_project_id=None, default_scopes=None):
        return AnonymousCredentials(), PROJECT

    google.auth.default = google.auth._default.default = anonymous_default


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Runs ``patch(module)`` right after ``name`` is first imported (it is not imported here:
    most processes never use it)."""

    def __init__(self, name, patch):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            self.patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def _secret_manager_from(secrets: dict):
    def patch(module):
        from google.api_core.exceptions import NotFound

        def access_secret_version(self, request=None, *, name=None, **_):
            name = name or getattr(request, "name", None) or (request or {}).get("name")
            if name not in secrets:
                raise NotFound(f"Secret Version [{name}] not found.")
            return SimpleNamespace(name=name, payload=SimpleNamespace(data=secrets[name].encode()))

        module.SecretManagerServiceClient.access_secret_version = access_secret_version

    return patch


if os.environ.get("STORAGE_EMULATOR_HOST"):
    with contextlib.suppress(ImportError):  # a Python without google-auth needs nothing
        _anonymous_credentials()
if os.environ.get("LOOPLINE_REHEARSAL_SECRETS"):
    _secrets = json.loads(os.environ["LOOPLINE_REHEARSAL_SECRETS"])
    sys.meta_path.insert(
        0, _PatchAfterImport(SECRET_MANAGER_CLIENT, _secret_manager_from(_secrets))
    )
