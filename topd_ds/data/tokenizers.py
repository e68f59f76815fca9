"""The run's tokenizer: the student's, after checking the teacher's is the same vocabulary."""

from topd_ds.errors import ConfigError


def load_tokenizers(cfg):
    """The student's tokenizer, after checking the teacher's is the same vocabulary (ids must agree)."""
    from transformers import AutoTokenizer

    student = AutoTokenizer.from_pretrained(cfg.model.student)
    teacher = AutoTokenizer.from_pretrained(cfg.model.teacher)
    if student.get_vocab() != teacher.get_vocab():
        raise ConfigError(f"model.teacher: tokenizer differs from model.student's ({len(teacher)} vs "
                          f"{len(student)} tokens); OPD needs one shared vocabulary")
    if student.eos_token_id is None:
        raise ConfigError(f"model.student: tokenizer has no eos token ({cfg.model.student})")
    return student
