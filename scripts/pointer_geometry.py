"""Where a picture lands in what the pointing model sees, for the diagnostic scripts
(pointer_attention.py, pointer_verify_data.py): the processor resizes it, aspect kept, and
centres it both in the global crop and in the canvas its tiles are cut from
(molmoe.processing.preprocess.resize_and_pad)."""
from molmoe.processing.preprocess import canvas_size, image_layout, scaled_size


def placements(height: int, width: int, settings):
    """((nh, nw, top, left) in the global crop, layout, (CH, CW) the canvas,
    (ch, cw, ctop, cleft) in the canvas) for a height x width picture."""
    crop = settings.crop_size
    nh, nw = scaled_size(height, width, crop, crop)
    lay = image_layout(height, width, settings)
    CH, CW = canvas_size(lay, settings)
    ch, cw = scaled_size(height, width, CH, CW)
    return ((nh, nw, (crop - nh) // 2, (crop - nw) // 2), lay, (CH, CW),
            (ch, cw, (CH - ch) // 2, (CW - cw) // 2))
