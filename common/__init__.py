"""What ``trainer`` and ``serving`` share, so that neither imports the other.

- :mod:`common.contract`: the serving boundary (signature names, inputs, outputs, dtypes and
  shapes), imported by the export, the client, batch scoring and the server tests.
- :mod:`common.staging`: staged writes (temporary sibling, then rename) and stale-temp cleanup.
- :mod:`common.cli`: the one way a command line turns an input error into ``error: ...`` and
  exit status 2.

TensorFlow-free at import.
"""
