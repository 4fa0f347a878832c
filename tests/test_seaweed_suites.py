"""The S3 cases of the lake and output-safety suites, collected again to run on SeaweedFS, a real S3 server.

Those modules were written against moto (`moto_s3`, or a module-local `s3`); imported here,
the same test functions resolve their fixtures in this module: conftest's `s3`, a fresh
bucket on the session's SeaweedFS, so they hold against a server that checks signatures,
conditions and bucket rules. (The lease's S3 cases run on both servers in
test_lease_takeover.py already.) Once those modules take `s3` themselves, drop them here.
"""

from __future__ import annotations

import pytest
from test_crash_recovery import test_a_kill_9_on_s3_mid_commit_is_completed_by_the_next_run  # noqa: F401
from test_lake import test_lake_tables_in_and_out_of_s3  # noqa: F401
from test_output_overlap import test_s3_outputs_overlapping_the_input_are_refused  # noqa: F401
from test_output_ownership import test_foreign_files_on_s3_are_refused_or_left_alone  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.fixture
def moto_s3(s3):
    """In this module the cases written against moto get SeaweedFS instead."""
    return s3
