"""The git revision pypooler was built from, for `pypooler_build_info` (metrics.py).

A wheel's copy of this file is rewritten by setup.py's build (from PYPOOLER_GIT_REVISION, else
`git rev-parse` of the checkout being built); a source checkout and a build without either say
"unknown" rather than guess.
"""

GIT_REVISION = "unknown"
