"""DVC stage ``check_params``: read and validate the whole of ``params.yaml``.

Every other stage depends on the keys it reads, one by one, so a key that no stage reads (a
misspelt section such as ``evalute:``, a top-level ``sede: 7``) would change none of them,
and ``dvc repro`` would say that everything is up to date while the change the user meant
never happens. This stage depends on the whole file: any edit runs it, and a key that is
unknown or a value out of range stops ``dvc repro`` with one line naming it, as does a
``data.source`` that does not exist or lies outside ``data/raw/``, a ``backbone.name`` that
timm or torchvision does not build, a ``backbone.weights`` that is no state-dict file in
``weights/``, and a malformed ``data.exclude`` or ``data.relabel`` file: ``dvc
repro`` runs this stage first, before it deletes the outputs of ``prepare`` to run it (``dvc
repro prepare`` alone skips it, and ``prepare`` checks them too). It writes nothing.
"""

from __future__ import annotations

import dataclasses
import logging

from transfer.curation import read_curation
from transfer.errors import run_stage
from transfer.layout import PARAMS
from transfer.params import check_backbone_name, check_weights_file, load_params
from transfer.sources import check_source

log = logging.getLogger(__name__)


def main() -> None:
    params = load_params(PARAMS)
    # A relabel to a label that is not a class is left to prepare, which lists the classes.
    check_source(params.data.source)
    check_backbone_name(params.backbone.name)
    check_weights_file(params.backbone.name, params.backbone.weights)
    read_curation(params.data.exclude, params.data.relabel)
    sections = [f.name for f in dataclasses.fields(params)
                if dataclasses.is_dataclass(getattr(params, f.name))]
    log.info("%s: every key is known and every value valid (%s)", PARAMS, ", ".join(sections))


if __name__ == "__main__":
    run_stage(main)
