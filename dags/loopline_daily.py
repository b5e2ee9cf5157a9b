"""Loopline's Airflow DAGs: one daily DAG per blueprint found in the blueprints directory.

Blueprints are read from $LOOPLINE_BLUEPRINTS_DIR, else `blueprints/` next to this file (in
Composer: gs://<composer bucket>/dags/blueprints/), else the repository's `examples/`. Each
`<name>.yaml` becomes the DAG `loopline_<name>` (see loopline_dags/factory.py for the tasks, the
Variables it reads and the bucket layout). This file imports only Airflow, its Google provider
and PyYAML.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The helpers live beside this file; Airflow puts the DAG folder on sys.path in most setups, but
# not every DAG bundle does, so make it so.
_DAG_FOLDER = str(Path(__file__).resolve().parent)
if _DAG_FOLDER not in sys.path:
    sys.path.insert(0, _DAG_FOLDER)

from loopline_dags.blueprints import blueprint_dir, find_blueprints  # noqa: E402
from loopline_dags.factory import build_dag  # noqa: E402

for _info in find_blueprints(blueprint_dir(Path(__file__).parent)):
    _dag = build_dag(_info)
    globals()[_dag.dag_id] = _dag
