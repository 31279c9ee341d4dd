"""NVIDIA's Xid catalog: what each Xid means and what NVIDIA says to do about it.

Source: NVIDIA's Xid catalog (the "Catalog" sheet of Xid-Catalog.xlsx behind
docs.nvidia.com/deploy/xid-errors/analyzing-xid-catalog.html), read through the table that
leptonai/gpud generates from it (``components/accelerator/nvidia/xid/catalog_generated.go``; FACTS.md
section 2 lists its buckets). Each entry keeps NVIDIA's two resolution columns as printed there:
``immediate`` (what to do now) and ``follow_up`` (the "investigatory" column). This module maps the
immediate column onto the five actions verify acts on:

=====================  ===============================================  ===============
catalog bucket          action                                           gpu.xid status
=====================  ===============================================  ===============
IGNORE                  none                                             pass (warn when
                                                                         follow_up asks for
                                                                         more, e.g. 43)
RESTART_APP             restart the application                          warn
WORKFLOW_XID_45         restart the application (45 follows other
                        Xids: those decide)                              warn
UPDATE_SWFW, CHECK_UVM  restart the application (software-level; our
                        reading: the catalog names no GPU action)        warn
RESET_GPU               reset the GPU                                    fail
WORKFLOW_XID_48         reset the GPU (DBE: remap rows / retire pages,
                        which take effect after a reset)                 fail
WORKFLOW_NVLINK_ERR,    reset the GPU (the NVLink workflows end in a
WORKFLOW_NVLINK5_ERR    reset; the 144-150 subcode decode is not done
                        here, so every one is taken as fatal)            fail
XID_154                 what the line says it changed to (reset,
                        reboot, none); reset when unreadable             fail/pass
RESTART_BM, RESTART_VM  reboot the node                                  fail
CONTACT_SUPPORT,        contact support (the catalog's "Unused" codes
CHECK_MECHANICALS       are all CONTACT_SUPPORT: a driver that prints
                        one is not one NVIDIA expects)                   fail
=====================  ===============================================  ===============

Xids 162-172 have no resolution in that table yet; their actions below are our reading of NVIDIA's
descriptions and are marked ``ours``. An Xid that is not in the catalog at all (a newer driver) is
a warning, never a silent pass. Azure's shorter list of critical Xids (FACTS.md) is not used: the
catalog covers every code it names, and disagrees on a few (63 is an informational remap event, and
the pending remap it records is ``gpu.memory_errors``' job; 68/69/80 are application-level).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from checks.result import Status


class Action(enum.Enum):
    """What NVIDIA recommends doing now, in the five words verify uses."""

    NONE = "none"
    RESTART_APP = "restart the application"
    RESET_GPU = "reset the GPU"
    REBOOT = "reboot the node"
    CONTACT_SUPPORT = "contact support"

    @property
    def status(self) -> Status:
        """Reset, reboot and support take the node out of service (fail); the application's problem warns."""
        if self in (Action.RESET_GPU, Action.REBOOT, Action.CONTACT_SUPPORT):
            return Status.FAIL
        return Status.WARN if self is Action.RESTART_APP else Status.PASS


BUCKET_ACTION = {
    "IGNORE": Action.NONE,
    "RESTART_APP": Action.RESTART_APP,
    "WORKFLOW_XID_45": Action.RESTART_APP,
    "UPDATE_SWFW": Action.RESTART_APP,
    "CHECK_UVM": Action.RESTART_APP,
    "RESET_GPU": Action.RESET_GPU,
    "WORKFLOW_XID_48": Action.RESET_GPU,
    "WORKFLOW_NVLINK_ERR": Action.RESET_GPU,
    "WORKFLOW_NVLINK5_ERR": Action.RESET_GPU,
    "XID_154": Action.RESET_GPU,
    "RESTART_BM": Action.REBOOT,
    "RESTART_VM": Action.REBOOT,
    "CONTACT_SUPPORT": Action.CONTACT_SUPPORT,
    "CHECK_MECHANICALS": Action.CONTACT_SUPPORT,
}

# Follow-up values that ask for nothing more.
QUIET_FOLLOW_UPS = frozenset({"", "IGNORE", "IGNORE (sympathetic)", "N/A (informational)"})


@dataclass(frozen=True)
class XidInfo:
    xid: int
    name: str  # NVIDIA's description
    immediate: str  # the catalog's immediate resolution bucket ("" where it gives none)
    follow_up: str  # the catalog's investigatory resolution ("" where it gives none)
    ours: Action | None = None  # our reading, where the catalog gives no immediate resolution

    @property
    def action(self) -> Action:
        if self.ours is not None:
            return self.ours
        return BUCKET_ACTION.get(self.immediate, Action.CONTACT_SUPPORT)

    @property
    def needs_follow_up(self) -> bool:
        return self.follow_up not in QUIET_FOLLOW_UPS


_U = "Unused"  # catalog rows NVIDIA marks unused: every one is CONTACT_SUPPORT
_CS, _RA, _RG, _IG = "CONTACT_SUPPORT", "RESTART_APP", "RESET_GPU", "IGNORE"
_APP = "CHECK_APP/CUDA"

_ROWS: list[tuple] = [
    (1, _U, _CS, ""), (2, _U, _CS, ""), (3, _U, _CS, ""), (4, _U, _CS, ""), (5, _U, _CS, ""), (6, _U, _CS, ""),
    (7, _U, _CS, ""),
    (8, "GPU stopped processing", _RA, _CS),
    (9, _U, _CS, ""), (10, _U, _CS, ""),
    (11, "Invalid or corrupted push buffer stream", _RA, _APP),
    (12, _U, _CS, ""),
    (13, "Graphics Engine Exception", _RA, "WORKFLOW_XID_13"),
    (14, _U, _IG, _CS),
    (15, _U, _CS, ""), (16, _U, _CS, _CS), (17, _U, _CS, ""), (18, _U, _CS, ""), (19, _U, _CS, ""),
    (20, _U, _CS, ""), (21, _U, _CS, ""), (22, _U, _CS, ""), (23, _U, _CS, ""), (24, _U, _CS, ""),
    (25, "Invalid or illegal push buffer stream", _RA, _APP),
    (26, _U, _CS, ""), (27, _U, _CS, ""), (28, _U, _CS, ""), (29, _U, _CS, ""), (30, _U, _CS, ""),
    (31, "GPU memory page fault", _RA, "WORKFLOW_XID_31"),
    (32, "Invalid or corrupted push buffer stream", _RA, _APP),
    (33, _U, _CS, ""), (34, _U, _CS, ""), (35, _U, _CS, ""), (36, _U, _CS, ""),
    (37, "Driver firmware error", _IG, _APP),
    (38, "Driver firmware error", _IG, _CS),
    (39, "Copy Engine Exception", _RA, _CS), (40, "Copy Engine Exception", _RA, _CS),
    (41, "Copy Engine Exception", _RA, _CS),
    (42, _U, _CS, ""),
    (43, "GPU stopped processing", _IG, _CS),
    (44, "Graphics Engine fault during context switch", _IG, _CS),
    (45, "Preemptive cleanup, due to previous errors", "WORKFLOW_XID_45", "RESTART_FM when alone, else IGNORE"),
    (46, "GPU stopped processing", _RG, _CS),
    (47, _U, _CS, ""),
    (48, "Double Bit ECC Error", "WORKFLOW_XID_48", "WORKFLOW_XID_48"),
    (49, _U, _CS, ""), (50, _U, _CS, ""), (51, _U, _CS, ""), (52, _U, _CS, ""), (53, _U, _CS, ""),
    (54, "Auxiliary power is not connected to the GPU board", "CHECK_MECHANICALS", _CS),
    (55, _U, _CS, ""), (56, _U, _CS, ""), (57, _U, _CS, ""), (58, _U, _CS, ""), (59, _U, _CS, ""),
    (60, "Video processor exception", _RA, "INVESTIGATE_SW"),
    (61, _U, _CS, ""),
    (62, "Internal micro-controller halt", _RG, _CS),
    (63, "GPU memory remapping event (ECC page retirement or row remap recorded)", _IG, _IG),
    (64, "GPU memory remapping failure", _RG, _CS),
    (65, _U, _CS, ""),
    (66, "Illegal access by driver", _IG, "INVESTIGATE_SW"),
    (67, "Illegal access by driver", _IG, _CS),
    (68, "NVDEC0 Exception", _RA, _CS),
    (69, "Graphics Engine class error", _RA, _APP),
    (70, "CE3: Unknown Error", _RA, _CS), (71, "CE4: Unknown Error", _RA, _CS), (72, "CE5: Unknown Error", _RA, _CS),
    (73, _U, _CS, ""),
    (74, "NVLINK Error", "WORKFLOW_NVLINK_ERR", _CS),
    (75, "CE6: Unknown Error", _RA, _CS), (76, "CE7: Unknown Error", _RA, _CS), (77, "CE8: Unknown Error", _RA, _CS),
    (78, "vGPU Start Error", "UPDATE_SWFW", "UPDATE_SWFW"),
    (79, "GPU has fallen off the bus", "RESTART_BM", _CS),
    (80, "Corrupted data sent to GPU", _RA, _APP),
    (81, _U, _CS, ""),
    (82, "NVJPG0 Error", _RA, _CS), (83, "NVDEC1 Error", _RA, _CS), (84, "NVDEC2 Error", _RA, _CS),
    (85, "CE9: Unknown Error", _RA, _CS), (86, "OFA Exception", _RA, _CS),
    (87, _U, _CS, ""),
    (88, "NVDEC3 Error", _RA, _CS), (89, "NVDEC4 Error", _RA, _CS),
    (90, _U, _CS, ""), (91, _U, _CS, ""),
    (92, "High single-bit ECC error rate", _IG, _CS),
    (93, "Non-fatal violation of provisioned InfoROM wear limit", _IG, _CS),
    (94, "Contained memory error", _RA, "IGNORE (sympathetic)"),
    (95, "Uncontained memory error", _RG, "IGNORE (sympathetic)"),
    (96, "NVDEC5 Error", _RA, _CS), (97, "NVDEC6 Error", _RA, _CS), (98, "NVDEC7 Error", _RA, _CS),
    (99, "NVJPG1 Error", _RA, _CS), (100, "NVJPG2 Error", _RA, _CS), (101, "NVJPG3 Error", _RA, _CS),
    (102, "NVJPG4 Error", _RA, _CS), (103, "NVJPG5 Error", _RA, _CS), (104, "NVJPG6 Error", _RA, _CS),
    (105, "NVJPG7 Error", _RA, _CS),
    (106, "SMBPBI Test Message", _IG, _IG), (107, "SMBPBI Test Message Silent", _IG, _IG),
    (108, _U, _IG, "XID_137_FLOW"),
    (109, "Context Switch Timeout Error", _RG, _CS),
    (110, "Security Fault Error", _RG, "INVESTIGATE_SW"),
    (111, _U, _CS, ""), (112, _U, _CS, ""), (113, _U, _CS, ""), (114, _U, _CS, ""), (115, _U, _CS, ""),
    (116, _U, _CS, ""), (117, _U, _CS, ""), (118, _U, _CS, ""),
    (119, "GSP RPC Timeout", _RG, "INVESTIGATE_SW"),
    (120, "GSP Error", _RG, "INVESTIGATE_SW"),
    (121, "C2C Error", _IG, _CS),
    (122, _U, _CS, ""), (123, _U, _CS, ""), (124, _U, _CS, ""), (125, _U, _CS, ""),
    *[(x, f"CE{x - 116}: Unknown Error", _RA, _CS) for x in range(126, 136)],
    (136, "Link Training Failed", _RG, "INVESTIGATE_LINK_SI"),
    (137, "NVLink Privilege Error", _IG, "XID_137_FLOW"),
    (138, _U, _CS, ""),
    (139, "OFA1 Error", _RA, _CS),
    (140, "ECC Unrecovered Error", _RG, _CS),
    (141, "CUDA Fast Path Error", _IG, _CS),
    (142, "NVENC3 Error", _CS, ""),
    (143, "GPU Initialization Error", _RG, _CS),
    (144, "NVLINK: SAW Error", "WORKFLOW_NVLINK5_ERR", "WORKFLOW_NVLINK5_ERR"),
    (145, "NVLINK: RLW Error", "WORKFLOW_NVLINK5_ERR", "WORKFLOW_NVLINK5_ERR"),
    (146, "NVLINK: TLW Error", "WORKFLOW_NVLINK5_ERR", "WORKFLOW_NVLINK5_ERR"),
    (147, "NVLINK: TREX Error", "WORKFLOW_NVLINK5_ERR", "WORKFLOW_NVLINK5_ERR"),
    (148, "NVLINK: NVLPW_CTRL Error", "WORKFLOW_NVLINK5_ERR", "WORKFLOW_NVLINK5_ERR"),
    (149, "NVLINK: NETIR Error", "WORKFLOW_NVLINK5_ERR", "WORKFLOW_NVLINK5_ERR"),
    (150, "NVLINK: MSE Error", "WORKFLOW_NVLINK5_ERR", "WORKFLOW_NVLINK5_ERR"),
    (151, "Key rotation Error", "RESTART_VM", _CS),
    (152, "DLA SMMU Error", _IG, _CS),
    (153, "DLA timeout Error", _IG, _CS),
    (154, "GPU Recovery Action Changed", "XID_154", "N/A (informational)"),
    (155, "NVLINK: SW Defined Error", _RG, "INVESTIGATE_SW_USER"),
    (156, "Resource Retirement Event", _RG, _IG),
    (157, "Resource Retirement Failure", _IG, _CS),
    (158, "GPU Fatal Timeout", _RG, _CS),
    (159, "CHI Non-Data Error", "CHECK_UVM", "SYMPATHETIC_REPORT_SOLO"),
    (160, "Channel Retirement Event", _IG, "INVESTIGATE_SW"),
    (161, "Channel Retirement Failure", _IG, "INVESTIGATE_SW"),
    # No resolution in the catalog table yet: the actions are ours, from NVIDIA's descriptions.
    (162, "Power Smoothing HW Circuitry capability reengaged", "", "", Action.NONE),
    (163, "Power Smoothing HW Circuitry capability disengaged", "", "INVESTIGATE_HW", Action.NONE),
    (164, "Power Smoothing HW Circuitry low lifetime reached", "", _CS, Action.NONE),
    (165, "Power Smoothing HW Circuitry lifetime exhausted", "", _CS, Action.CONTACT_SUPPORT),
    (166, "NVLink traffic before the link was set up for encryption (CC mode)", "", "INVESTIGATE_SW",
     Action.RESTART_APP),
    (167, "PCIe fatal timeout", "", _CS, Action.RESET_GPU),
    (168, "Reduced GPU memory capacity (errors in the write-protected region)", "", _CS, Action.CONTACT_SUPPORT),
    (169, "Internal micro-controller halt (SEC2)", "", _CS, Action.RESET_GPU),
    (170, "Interrupt seen in CC mode", "", "INVESTIGATE_SW", Action.RESTART_APP),
    (171, "Uncorrectable DRAM error (detail of Xid 48)", "", _CS, Action.RESET_GPU),
    (172, "Uncorrectable SRAM error (detail of Xid 48)", "", _CS, Action.RESET_GPU),
]

CATALOG: dict[int, XidInfo] = {row[0]: XidInfo(*row) for row in _ROWS}

# Xid 154's line names the recovery action it changed to, e.g. "... from 0x0 (None) to 0x2 (Node Reboot
# Required)".
_CHANGED_TO = re.compile(r"\bto\s+(?:0x[0-9a-f]+\s*)?\(([^)]*)\)", re.IGNORECASE)


def lookup(xid: int) -> XidInfo | None:
    return CATALOG.get(xid)


def action_for(xid: int, text: str = "") -> Action | None:
    """The action for one Xid line; None when the Xid is not in the catalog. Xid 154 says in its own text
    what it changed the GPU's recovery action to; unreadable, it counts as a reset."""
    info = CATALOG.get(xid)
    if info is None:
        return None
    if xid == 154:
        m = _CHANGED_TO.search(text or "")
        target = m.group(1).lower() if m else ""
        if "reboot" in target:
            return Action.REBOOT
        if target.strip() == "none":
            return Action.NONE
        return Action.RESET_GPU
    return info.action


def status_for(xid: int, text: str = "") -> Status:
    """fail (reset/reboot/support), warn (application level, an Xid that needs follow-up, an Xid the
    catalog does not know) or pass (nothing to do)."""
    action = action_for(xid, text)
    if action is None:
        return Status.WARN
    status = action.status
    if status is Status.PASS and CATALOG[xid].needs_follow_up and xid != 154:
        return Status.WARN
    return status
