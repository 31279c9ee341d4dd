# peftnode: read a stack file through the project's own loader (checks.stack.load_stack).
"""Ansible lookup plugin ``peftnode_stack``: the validated stack dict for a stack name or file."""

from __future__ import annotations

import os
import sys

from ansible.errors import AnsibleLookupError
from ansible.module_utils.common.text.converters import to_text
from ansible.plugins.lookup import LookupBase
from ansible.utils.display import Display

DOCUMENTATION = r"""
name: peftnode_stack
author: peftnode maintainers
version_added: "0.1.0"
short_description: Load and validate a peftnode stack file
description:
  - Reads a stack file (C(stacks/*.yml)) and returns it as a dictionary after validating it with
    C(checks.stack.load_stack), the same loader that C(invoke verify) uses, so provisioning and
    verification can never disagree about what a stack pins.
  - A bare name such as C(cu117) is looked up in the directories named by C($PEFTNODE_STACKS)
    (colon-separated), then in the repository's C(stacks/), then in C(/etc/peftnode/stacks).
  - Anything containing a C(/) or ending in C(.yml) or C(.yaml) is taken as a file path. A relative
    path is tried against the current directory first, then against the playbook's directory.
  - 'A stack that fails validation fails the lookup. The error lists every problem on its own line,
    each as C(<file>: <key.path>: <reason>).'
  - The loader is imported from the repository this plugin belongs to (the parent of
    C(lookup_plugins/)), which is put on C(sys.path) for that; outside a checkout, an installed
    C(checks) package is used.
options:
  _terms:
    description: Stack names or stack file paths, one stack per term.
    type: list
    elements: str
    required: true
notes:
  - The lookup runs on the controller; the stack file is never read on the managed node.
  - Values returned are marked unsafe by Ansible, so text inside a stack is never templated.
"""

EXAMPLES = r"""
- name: Load the stack named by peftnode_stack_name (cu117 when unset)
  ansible.builtin.set_fact:
    peftnode_stack: "{{ lookup('peftnode_stack', peftnode_stack_name | default('cu117')) }}"

- name: Show the NCCL version a stack file in another directory pins
  ansible.builtin.debug:
    msg: "{{ lookup('peftnode_stack', '/srv/mirror/stacks/site-a.yml').nccl.version }}"

- name: Load two stacks at once
  ansible.builtin.debug:
    msg: "{{ item.name }} pins CUDA {{ item.cuda.version }}"
  loop: "{{ query('peftnode_stack', 'cu117', 'cu124') }}"
"""

RETURN = r"""
_raw:
  description:
    - One validated stack per term, as the mapping found in the file (C(schema), C(name),
      C(openssl), C(python), C(nvidia_driver), C(cuda), C(nccl), C(cudnn), C(venv), C(jupyterlab),
      C(model), C(finetune), C(node)).
    - With C(lookup) and a single term this is the mapping itself.
  type: list
  elements: dict
"""

display = Display()

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stack_module():
    """Import checks.stack: this checkout's copy when the plugin sits in one, else any importable one.

    The repository root goes first on sys.path when it holds ``checks/stack.py``, so a playbook run
    from a checkout always validates with that checkout's loader (and finds its ``stacks/``), even
    if a different peftnode is installed in the Python that runs Ansible.
    """
    if os.path.isfile(os.path.join(REPO_ROOT, "checks", "stack.py")) and REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    try:
        from checks import stack  # imported here, once sys.path holds the repo root
    except ImportError as exc:
        raise AnsibleLookupError(
            f"peftnode_stack: cannot import checks.stack (looked in {REPO_ROOT} and on sys.path): {exc}"
        ) from exc
    return stack


def _looks_like_path(term: str) -> bool:
    return "/" in term or term.endswith((".yml", ".yaml"))


class LookupModule(LookupBase):
    def _locate(self, term: str, variables) -> str:
        """A relative path: the current directory first, then the playbook's directory."""
        if not _looks_like_path(term) or os.path.isabs(term) or os.path.exists(term):
            return term
        basedir = self._loader.get_basedir() if self._loader else None
        if not basedir and variables:
            basedir = variables.get("playbook_dir")
        if basedir:
            candidate = os.path.join(to_text(basedir), term)
            if os.path.exists(candidate):
                return candidate
        return term  # let the loader report it as missing, under the name the user gave

    def run(self, terms, variables=None, **kwargs):
        self.set_options(var_options=variables, direct=kwargs)
        stack = _stack_module()
        results = []
        for raw in terms:
            if not isinstance(raw, str) or not raw.strip():
                raise AnsibleLookupError(f"peftnode_stack: expected a stack name or a file path, got {raw!r}")
            term = self._locate(to_text(raw).strip(), variables)
            display.vvv(f"peftnode_stack: loading {term!r}")
            try:
                loaded = stack.load_stack(term)
            except stack.StackError as exc:
                raise AnsibleLookupError(
                    f"peftnode_stack: cannot use stack {raw!r}:\n" + "\n".join(exc.problems)
                ) from None
            display.vvv(f"peftnode_stack: {loaded.name} from {loaded.source}")
            for warning in getattr(loaded, "warnings", []):
                display.warning(f"peftnode_stack: {warning}")
            results.append(loaded.data)
        return results
