"""The masking study: config (``config``), which case plays which role (``protocol``), the runs (``run``) and the
read-out (``report``)."""

from .config import (
    DEFAULT_ARMS,
    MODIFIERS,
    NAMED,
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
from .protocol import check_protocol, describe_protocol, label_counts
from .report import summarize
from .reproduce import compare, reproduce
from .run import probe_arm, run_one, study

__all__ = ["DEFAULT_ARMS", "MODIFIERS", "NAMED", "PhantomSet", "StudyConfig", "StudyFinetuneTrain", "StudyFinetuneVal",
           "StudySection", "TestSet", "check_protocol", "describe_protocol", "expand_arms", "finetune_config",
           "label_counts", "parse_arm", "probe_arm", "compare", "reproduce", "run_one", "study", "summarize"]
