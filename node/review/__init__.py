"""Review: reviewers, their electronic signatures, approve and reject (issue 10 §4)."""
