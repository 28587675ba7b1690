"""Evaluation: the shapes-world analyzer, GenEval-style prompt faithfulness, PSNR / SSIM."""
from ldm.eval.analyzer import Detection, analyze
from ldm.eval.geneval import CATEGORIES, EvalPrompt, evaluate, format_report, make_eval_prompts, score
from ldm.metrics import psnr, ssim

__all__ = ["Detection", "analyze", "CATEGORIES", "EvalPrompt", "evaluate", "format_report",
           "make_eval_prompts", "score", "psnr", "ssim"]
