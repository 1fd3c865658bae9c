"""One slot as a Director runs it: admission first, then the stages under the guards.

Shared by the demo Director and the stress test, so that what the stress test measures is
what the demo does. A slot ends in one of four outcomes:

* ``full``: admitted, ran at full size;
* ``degraded``: admission refused it, but at least ``min_scale`` of its forecast activations
  fit, so it ran with its activations scaled down (a real Director lowers the resolution or
  the frame count): a slot kept instead of missed. With ``fit``, also a slot one of whose
  stages asked for more than fits at that moment and was shrunk to fit (``fit_allocation``):
  what admission cannot foresee (a spike in one slot among alike ones) is degraded at the
  stage it hits, before anything is allocated, instead of aborting the slot;
* ``skipped``: refused, and less than ``min_scale`` fits: skipped before any stage ran, so no
  compute is wasted on it;
* ``aborted``: refused mid-slot by a guard, or an OOM the guards did not see.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from app.demo.workload import STAGE_SECONDS, Device, SlotPlan
from app.errors import MemoryPressureError
from app.monitor import MIN_SCALE, Admission, VRAMMonitor  # below MIN_SCALE: skipped
from app.units import fmt_pct

logger = logging.getLogger("app.demo")



@dataclass(frozen=True)
class SlotResult:
    outcome: str  # full, degraded, skipped, aborted
    scale: float  # the share of its full-size activations the slot ran at
    admission: Admission | None
    abort_reason: str | None = None  # MemoryPressureError.reason when aborted
    completed_stage_s: float = 0.0  # modelled compute of the stages that completed


def run_slot(
    monitor: VRAMMonitor,
    device: Device,
    slot: int,
    plan: SlotPlan,
    *,
    admission: bool = True,
    fit: bool = True,
    min_scale: float = MIN_SCALE,
    work: Callable[[str], None] | None = None,
    keep_bytes: int = 0,
    rehearse: bool = True,
) -> SlotResult:
    """Run ``slot``: ``work(stage)`` is the stage's compute (the demo sleeps); ``keep_bytes``
    stay allocated after the slot (a deliberate leak). ``rehearse``: admit by rehearsing
    the device's presets when it has them (else, or with False, by the forecast)."""
    presets = device.presets(plan) if admission and rehearse else None
    adm = monitor.admit(slot, presets=presets) if admission else None
    scale = 1.0
    if adm is not None and adm.decision == "refuse":
        if adm.activation_scale < min_scale:
            monitor.skip_slot(slot, adm.reason)
            return SlotResult("skipped", 0.0, adm)
        scale = adm.activation_scale
    # A stage whose trace was rehearsed is known to fit, allocation by allocation; a guard
    # judging its peak as one block could only shrink it needlessly.
    rehearsed = {st.name for p in presets or () if p.scale == scale
                 for st in p.stages if st.trace is not None} \
        if adm is not None and adm.method == "rehearsal" else set()
    done_s = 0.0
    try:
        with monitor.generation(slot, scale=scale) as record:
            for stage, nbytes in plan.stages:
                context = f"slot {slot} {stage}"
                want = int(nbytes * scale)
                with monitor.stage(stage):
                    if stage in rehearsed:
                        got = want
                    elif fit:
                        got = monitor.fit_allocation(want, context, min_fraction=min_scale)
                    else:
                        got = want
                        monitor.check_allocation(want, context)
                    # a stage the guards shrank runs at that share of the slot's scale
                    at = scale * got / want if want else scale
                    with device.run_stage(stage, got, at, plan):
                        monitor.check_limits(context)
                        if stage == plan.unguarded_stage and plan.unguarded_bytes:
                            with device.activation(int(plan.unguarded_bytes * scale)):
                                pass  # not guarded: only the allocator stands in the way
                        if work is not None:
                            work(stage)
                done_s += STAGE_SECONDS.get(stage, 0.0) * scale
            if keep_bytes:
                device.keep(keep_bytes)
    except MemoryPressureError as exc:
        logger.warning("slot %d aborted: %s", slot, exc)
        return SlotResult("aborted", scale, adm, exc.reason, done_s)
    if record.outcome == "degraded":
        # DEBUG: a Director that degrades every slot would say it 20 times a second; the
        # monitor's refusal log says a run of refusals once (app/monitor/refusals.py).
        logger.debug("slot %d ran degraded (%s)", slot,
                    f"at {fmt_pct(scale)} of its activations" if scale < 1.0
                    else "a stage shrunk to fit")
    return SlotResult(record.outcome, scale, adm, None, done_s)
