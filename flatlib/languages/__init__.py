"""Synthetic languages with exact conditionals: the ground truth every experiment is measured against."""

from flatlib.languages.base import PAD, Corpus, Estimate, Language, LossEstimate, loss_estimate
from flatlib.languages.hmm import HMM
from flatlib.languages.pcfg import PAPER_TASK_SPANS, PCFG, RELEASED_TASK_SPANS, parse_rules
from flatlib.languages.spec import build_language, complete_language
from flatlib.languages.teacher import TeacherLM

__all__ = ["PAD", "Corpus", "Estimate", "Language", "LossEstimate", "loss_estimate", "HMM", "PCFG",
           "parse_rules", "PAPER_TASK_SPANS", "RELEASED_TASK_SPANS", "TeacherLM", "build_language",
           "complete_language"]
