"""The one error type for bad arguments and inputs, shared by every entry point.

It lives here, free of Beam, so that library modules (``loopline.readout``) and the pipelines'
launch path (``pipelines.launch``) raise and catch the same class.
"""


class UsageError(ValueError):
    """A bad argument or input, said in one sentence that names the flag and what to fix."""
