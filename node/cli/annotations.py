"""``lamina annotations | overlays | import-labels``: annotations for people at a terminal.

Thin: each command opens the node's context, calls the annotation service or
a bridge, prints, and audits what it wrote or sent.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import click

from node.cli.options import BadInput, node_context, node_options, user_name
from node.config import Settings


def _actor():
    from node.audit.trail import Actor

    return Actor(user=user_name())


def _label_names(pairs: tuple[str, ...]) -> dict[int, str]:
    names = {}
    for pair in pairs:
        value, sep, name = pair.partition("=")
        if not sep or not value.strip().isdigit() or not name.strip():
            raise BadInput(f"--label {pair!r}: expected VALUE=NAME, e.g. 1=Lung nodule")
        names[int(value)] = name.strip()
    return names


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


@click.group("annotations")
def annotations() -> None:
    """Annotations received (SEGs, overlay copies): state, structures, findings."""


@annotations.command("list")
@node_options
@click.option("--state", type=click.Choice([
    "received", "pending", "checked", "refused", "needs-adjudication", "adjudicated",
    "approved", "rejected"]))
@click.option("--series", "series_uid", help="Only annotations of this source series.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def list_annotations(settings: Settings, state: str | None, series_uid: str | None,
                     as_json: bool) -> None:
    """One line per annotation: id, kind, state, verdict, counts, annotator, series, and
    why it is in its state (what a pending one waits for, why one was refused)."""
    with node_context(settings) as ctx, ctx.index.reader() as r:
        rows = r.annotations.list(state, series_uid)
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    click.echo(f"{'ID':>5}  {'KIND':<7} {'STATE':<8} {'VERDICT':<8} {'FINDINGS':>8} "
               f"{'STRUCT':>6} {'OBJECTS':>7} {'REFUSED':>7}  ANNOTATOR  SERIES")
    for r in rows:
        who = r["annotator_ae"] + (f"/{r['annotator_person']}" if r["annotator_person"] else "")
        click.echo(f"{r['id']:>5}  {r['kind']:<7} {r['state']:<8} {r['verdict'] or '-':<8} "
                   f"{r['findings']:>8} {r['structures']:>6} {r['objects']:>7} {r['refused']:>7}"
                   f"  {who}  {r['source_series_uid'] or '-'}"
                   + (f"  ({r['state_reason']})" if r["state_reason"] else ""))


@annotations.command("show")
@node_options
@click.argument("annotation_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="The whole report as one JSON object.")
def show_annotation(settings: Settings, annotation_id: int, as_json: bool) -> None:
    """An annotation's structures and its current findings, with slice positions."""
    with node_context(settings) as ctx, ctx.index.reader() as r:
        protocol = ctx.annotations.protocol
        row = r.annotations.get(annotation_id)
        if row is None:
            raise BadInput(f"no annotation {annotation_id}")
        check = row["current_check_fk"]
        structures = r.annotations.structures(check) if check else []
        findings = r.annotations.findings(check) if check else []
        refused = r.annotations.refused_objects(annotation_id)
        objects = len(r.annotations.current_objects(annotation_id))
    report = {
        "annotation": row,
        "objects": objects,
        "structures": [{**{k: v for k, v in s.items() if k not in ("id", "check_fk")},
                        "window": _window(protocol, s["class_key"])} for s in structures],
        "findings": [{"check": f["check_name"], "structure_id": f["structure_id"],
                      "label": f["label"], "slices": json.loads(f["slices"]),
                      "detail": f["detail"]} for f in findings],
        "refused": [{"object_id": o["id"], "check": o["refusal_check"],
                     "reason": o["refusal_reason"], "quarantine_id": o["quarantine_fk"],
                     "received_at": o["received_at"]} for o in refused],
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    verdict = f" ({row['verdict']})" if row["verdict"] else ""
    click.echo(f"annotation {row['id']}: {row['kind']}, {row['state']}{verdict}")
    click.echo(f"  series     {row['source_series_uid'] or '-'}")
    person = f", {row['annotator_person']}" if row["annotator_person"] else ""
    click.echo(f"  annotator  {row['annotator_ae']} @ {row['annotator_address']}{person}")
    if row["checked_at"]:
        click.echo(f"  checked    {row['checked_at']} under protocol {row['protocol_name']!r}")
    click.echo(f"  objects    {objects} accepted, {len(refused)} refused")
    click.echo(f"structures ({len(structures)})")
    for s in report["structures"]:
        span = f"slices {s['first_slice']}-{s['last_slice']}" if s["first_slice"] else "no slice"
        window = f" (review window {s['window']})" if s["window"] else ""
        click.echo(f"  {s['structure_id']}  {s['label']!r}  class {s['class_key'] or '(unknown)'}"
                   f"{window}  {s['voxels']} voxels  {s['volume_mm3']:.1f} mm³"
                   f"  max diameter {s['max_diameter_mm']:.1f} mm  {span}")
    click.echo(f"findings ({len(findings)})")
    for f in report["findings"]:
        where = ", ".join(f"slice {s['slice']} ({s['position_mm']:.2f} mm)" for s in f["slices"])
        click.echo(f"  {f['check']:<14} {f['structure_id']} {f['label']!r}  {where or '-'}")
        click.echo(f"  {'':<14} {f['detail']}")
    if refused:
        click.echo(f"refused ({len(refused)})")
        for o in report["refused"]:
            click.echo(f"  object {o['object_id']}  {o['reason']}  (quarantine {o['quarantine_id']})")


def _window(protocol, class_key: str | None) -> str | None:
    """A class's review window as ``name center/width``, for the reader checking its findings."""
    cls = next((c for c in protocol.classes if c.key == class_key), None)
    if cls is None or cls.window is None:
        return None
    center, width = protocol.windows[cls.window]
    return f"{cls.window} {center:g}/{width:g}"


@annotations.command("check")
@node_options
@click.argument("annotation_id", type=int)
def check_annotation(settings: Settings, annotation_id: int) -> None:
    """Check an annotation again under the current protocol; exit 1 when it has findings."""
    from node.checks.references import Refusal

    with node_context(settings) as ctx:
        try:
            report = ctx.annotations.recheck(annotation_id, _actor())
        except (LookupError, Refusal) as exc:
            raise BadInput(str(exc)) from None
    click.echo(f"annotation {annotation_id}: check {report.check_id or '(superseded)'}, "
               f"{len(report.findings)} finding(s)")
    for f in report.findings:
        click.echo(f"  {f.check:<14} {f.structure_id} {f.label!r}: {f.detail}")
    sys.exit(1 if report.findings else 0)


@annotations.command("to-seg")
@node_options
@click.argument("annotation_id", type=int)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the DICOM-SEG.")
def to_seg(settings: Settings, annotation_id: int, out: Path) -> None:
    """Write an annotation (overlay copies included) as a DICOM-SEG referencing its series."""
    from node.annotations.bridge import BridgeError

    with node_context(settings) as ctx:
        try:
            seg = ctx.annotations.as_seg(annotation_id)
        except (LookupError, BridgeError) as exc:
            raise BadInput(str(exc)) from None
        seg.save_as(out, enforce_file_format=True)
        ctx.audit.record("annotation.exported", _actor(), {
            "annotation_id": annotation_id, "format": "seg",
            "sop_instance_uid": str(seg.SOPInstanceUID), "segments": len(seg.SegmentSequence)})
    click.echo(f"wrote SEG with {len(seg.SegmentSequence)} segment(s) to {out}")


def _source_masks(ctx, source: Path | None, annotation_id: int | None, series_uid: str,
                  names: dict[int, str]):
    """Masks on ``series_uid``'s grid from a SEG file, a label map, or a stored annotation."""
    from pydicom import dcmread

    from node.annotations.bridge import label_map_masks
    from node.annotations.masks import Annotator
    from node.checks.references import Refusal
    from node.storage.blobs import sha256_of_file

    if (source is None) == (annotation_id is None):
        raise BadInput("give either a SEG or label-map file, or --annotation ID")
    annotator = Annotator(ctx.settings.node.ae_title, "local")
    if annotation_id is not None:
        grid, masks = ctx.annotations.masks_of(annotation_id)
    elif _is_dicom(source):
        try:
            grid, masks = ctx.annotations.masks_from_seg(dcmread(source), sha256_of_file(source)[0],
                                                         annotator)
        except Refusal as exc:
            raise BadInput(f"SEG does not fit the stored series: {exc.reason}") from None
    else:
        grid = ctx.annotations.grid(series_uid)
        masks = label_map_masks(source, grid, ctx.annotations.protocol, annotator, names)
    if grid.series_instance_uid != series_uid:
        raise BadInput("the annotation belongs to another series than --series")
    return grid, masks


@click.command("overlays")
@node_options
@click.argument("source", required=False,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--annotation", "annotation_id", type=int,
              help="A stored annotation (another reader's work) instead of a file.")
@click.option("--series", "series_uid", required=True, help="The stored source series.")
@click.option("--out", "out_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the copies (OV0001.dcm … by slice number).")
@click.option("--label", "labels", multiple=True, help="VALUE=NAME for a label map's values.")
@click.option("--window", help="Review window name (default: the first structure's class).")
@click.option("--send", "peer", help="Also C-STORE the copies to this peer.")
@click.option("--aet", help="Calling AE title for --send (default: node.ae_title).")
def overlays(settings: Settings, source: Path | None, annotation_id: int | None,
             series_uid: str, out_dir: Path, labels: tuple[str, ...], window: str | None,
             peer: str | None, aet: str | None) -> None:
    """Write copies of the source slices with a SEG's, a label map's or an annotation's
    masks as overlay planes (6000–601E), for Horos/OsiriX readers."""
    from node.annotations.bridge import BridgeError, overlay_copies
    from node.dimse.scu import PeerError, resolve_peer, send_files

    with node_context(settings) as ctx:
        protocol = ctx.annotations.protocol
        if window is not None and window not in protocol.windows:
            raise BadInput(f"--window: unknown window {window!r} "
                           f"(known: {', '.join(sorted(protocol.windows))})")
        try:
            target = resolve_peer(settings, peer) if peer else None
        except PeerError as exc:
            raise BadInput(str(exc)) from None
        try:
            grid, masks = _source_masks(ctx, source, annotation_id, series_uid,
                                        _label_names(labels))
            if window is None:
                classes = [protocol.class_for(m.label, m.type) for m in masks]
                window = next((c.window for c in classes if c and c.window), None)
            copies = overlay_copies(
                masks, grid, lambda k: ctx.annotations.stored_slice(grid.sop_instance_uids[k]),
                protocol.windows[window] if window else None)
        except (LookupError, BridgeError) as exc:
            raise BadInput(str(exc)) from None
        out_dir.mkdir(parents=True, exist_ok=True)
        files = []
        for k, ds in copies:
            path = out_dir / f"OV{k + 1:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        results = send_files(settings, target, files, aet) if target else []
        failed = [r for r in results if r.status != 0x0000]
        ctx.audit.record("annotation.exported", _actor(), {
            "format": "overlay", "annotation_id": annotation_id,
            "series_instance_uid": series_uid, "copies": len(files),
            "sent_to": target.ae_title if target else None, "send_failures": len(failed)})
    click.echo(f"wrote {len(files)} overlay cop{'y' if len(files) == 1 else 'ies'} to {out_dir}"
               + (f"; sent {len(results) - len(failed)} to {target.ae_title}" if target else ""))
    for r in failed[:10]:
        click.echo(f"failed: {r.path.name}: {r.status_text} {r.comment}".rstrip(), err=True)
    sys.exit(1 if failed else 0)


@click.command("import-labels")
@node_options
@click.argument("label_map", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--series", "series_uid", required=True, help="The stored series it was drawn on.")
@click.option("--label", "labels", multiple=True,
              help="VALUE=NAME, e.g. 1='Lung nodule' (default: 'label VALUE').")
@click.option("--creator", default="", help="ContentCreatorName of the SEG (the reader).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the SEG here.")
@click.option("--store", is_flag=True, help="Take the SEG in like a received one (checked).")
def import_labels(settings: Settings, label_map: Path, series_uid: str, labels: tuple[str, ...],
                  creator: str, out: Path | None, store: bool) -> None:
    """Import a NIfTI/NRRD label map on a stored series' grid as a DICOM-SEG."""
    from pydicom.filebase import DicomBytesIO

    from node.annotations.bridge import BridgeError, label_map_masks, masks_to_seg
    from node.annotations.masks import Annotator
    from node.ingest.types import Source

    if out is None and not store:
        raise BadInput("give --out FILE, --store, or both")
    with node_context(settings, with_key=store) as ctx:
        annotator = Annotator(settings.node.ae_title, "local", creator)
        try:
            grid = ctx.annotations.grid(series_uid)
            masks = label_map_masks(label_map, grid, ctx.annotations.protocol, annotator,
                                    _label_names(labels))
            headers = [ctx.annotations.stored_slice(uid, pixels=False)
                       for uid in grid.sop_instance_uids]
            seg = masks_to_seg(masks, grid, headers, ctx.annotations.protocol,
                               content_creator=creator)
        except (LookupError, BridgeError) as exc:
            raise BadInput(str(exc)) from None
        if out is not None:
            seg.save_as(out, enforce_file_format=True)
        ctx.audit.record("annotation.imported", _actor(), {
            "format": "label-map", "series_instance_uid": series_uid,
            "sop_instance_uid": str(seg.SOPInstanceUID), "segments": len(seg.SegmentSequence)})
        result = None
        if store:
            buffer = DicomBytesIO()
            seg.save_as(buffer, enforce_file_format=True)
            # Drawn on the stored (pseudonymous) series like an annotator's SEG, and
            # taken in like one: the clinical route would pseudonymise its references again.
            source = Source(settings.node.ae_title, "local", f"cli-{uuid.uuid4().hex}",
                            route="annotator")
            result = ctx.ingest.ingest_bytes(buffer.getvalue(), source)
    click.echo(f"SEG with {len(seg.SegmentSequence)} segment(s)"
               + (f" written to {out}" if out else ""))
    if result is not None:
        code = result.outcome.status.code
        click.echo(f"stored: 0x{code:04X} {result.action} {result.outcome.comment}".rstrip())
        sys.exit(0 if code == 0 else 1)
