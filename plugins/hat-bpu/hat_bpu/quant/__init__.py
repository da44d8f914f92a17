"""The quantizer: prepare (trace, fuse, place fake quant), fake quant, observers, calibration,
the fixed-point rules (:mod:`.qspec`) and the conversion of a prepared model to the integer IR."""
