"""What ``extract`` refuses up front, in one line and before any folder is made: sizes that cannot fit
the machine (batch, shard) and workers the Ray cluster cannot place; and the ``--teacher`` help names
every key a teacher entry takes."""

from __future__ import annotations

import dataclasses
import re

from featcache.extract.config import TeacherConfig
from tests.test_cli_ux import _help


def test_teacher_help_names_every_teacher_key():
    text = _help("extract")
    keys = {f.name for f in dataclasses.fields(TeacherConfig)} | {"preset"}
    named = set(re.findall(r"(\w+)=", text.split("--teacher", 1)[1].split("--view-policy", 1)[0]))
    assert keys <= named, f"--teacher help does not name {sorted(keys - named)}"
