"""nnU-Net v2 inside subfore: ResEnc networks built from plans by nnU-Net's own builder, and the export to
``nnUNetv2_train -pretrained_weights``. Needs the ``nnunet`` extra (docs/nnunet.md)."""
