"""The masking study: config (``config``), which case plays which role (``protocol``), the runs (``run``) and the
read-out (``report``)."""

from .config import (
    DEFAULT_ARMS,
    MODIFIERS,
    PhantomSet,
    StudyConfig,
    StudyFinetuneTrain,
    StudyFinetuneVal,
    StudySection,
    TestSet,
    expand_arms,
    finetune_config,
    parse_arm,
)
from .protocol import check_protocol, describe_protocol
from .report import summarize
from .run import probe_arm, run_one, study

__all__ = ["DEFAULT_ARMS", "MODIFIERS", "PhantomSet", "StudyConfig", "StudyFinetuneTrain", "StudyFinetuneVal",
           "StudySection", "TestSet", "check_protocol", "describe_protocol", "expand_arms", "finetune_config",
           "parse_arm", "probe_arm", "run_one", "study", "summarize"]
