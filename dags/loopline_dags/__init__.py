"""Helpers for Loopline's Airflow DAGs (dags/loopline_daily.py).

They run inside the Airflow environment, which has Airflow, its Google and Beam providers and
PyYAML but none of Loopline's own dependencies: blueprints are read here with plain YAML, and
every pipeline runs elsewhere (Dataflow Flex Templates, Vertex AI Pipelines).
"""
