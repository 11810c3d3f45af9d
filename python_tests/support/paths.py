"""Where the tests find the repository and the real data."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# ../shared/realdata beside the checkout (CI has it; tests that need it skip without it).
REALDATA = REPO_ROOT.parent / "shared" / "realdata"
