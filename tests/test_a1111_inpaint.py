"""A1111 inpainting options: crop-region math, mask handling, fills, paste-back and outpainting."""
import numpy as np
import pytest
from PIL import Image

from runtime.a1111.inpaint import (
    FILL_MODES, InpaintOptions, blend_latents, fill_index, initial_latents, outpaint_canvas, paste_back, prepare,
)
from runtime.a1111.masking import blur_mask, crop_region, expand_crop_region, gaussian_kernel, resize_image
from runtime.errors import UserError

RNG = np.random.default_rng(1234)


def noise_image(width: int, height: int) -> Image.Image:
    """A random RGB image: a fake generator's output."""
    return Image.fromarray(RNG.integers(0, 256, (height, width, 3), dtype=np.uint8))


def box_mask(size, box) -> Image.Image:
    """A hard mask, white inside box."""
    m = np.zeros((size[1], size[0]), np.uint8)
    x1, y1, x2, y2 = box
    m[y1:y2, x1:x2] = 255
    return Image.fromarray(m)


# expand_crop_region's docstring example and its clamping at the borders, worked by hand.
@pytest.mark.parametrize("box, target, size, expected", [
    ((200, 100, 328, 132), (512, 512), (512, 512), (200, 52, 328, 180)),     # 128x32 -> 128x128
    ((0, 0, 128, 32), (512, 512), (512, 512), (0, 0, 128, 128)),             # pushed down from the top
    ((0, 490, 128, 512), (512, 512), (512, 512), (0, 384, 128, 512)),        # pushed up from the bottom
    ((100, 100, 228, 228), (768, 512), (1024, 1024), (68, 100, 260, 228)),   # 1:1 -> 3:2, wider
    ((0, 0, 64, 64), (512, 512), (32, 64), (0, 0, 32, 64)),                  # cannot grow past the image
])
def test_expand_crop_region_hand_examples(box, target, size, expected):
    assert expand_crop_region(box, *target, *size) == expected


def test_crop_region_pads_clips_and_reports_blank():
    mask = box_mask((100, 80), (10, 20, 30, 40))
    assert crop_region(mask) == (10, 20, 30, 40)
    assert crop_region(mask, 15) == (0, 5, 45, 55)
    assert crop_region(mask, 100) == (0, 0, 100, 80)
    assert crop_region(box_mask((100, 80), (0, 0, 0, 0)), 32) is None


def test_gaussian_kernel_is_a1111s_size_and_normalised():
    k = gaussian_kernel(4)
    assert len(k) == 21 and np.isclose(k.sum(), 1) and np.allclose(k, k[::-1])
    assert len(gaussian_kernel(1)) == 7 and k.argmax() == 10


def test_blur_zero_keeps_a_hard_mask_and_blur_is_separable():
    mask = box_mask((64, 64), (16, 24, 40, 48))
    hard = prepare(noise_image(64, 64), mask, 64, 64, InpaintOptions(mask_blur=0, inpaint_full_res=False))
    assert np.array_equal(np.asarray(hard.mask), np.asarray(mask))
    only_x = np.asarray(blur_mask(mask, 4, 0))
    assert set(np.unique(only_x[:, 28])) == {0, 255}           # columns untouched: no vertical blur
    assert 0 < only_x[30, 16] < 255
    soft = np.asarray(blur_mask(mask, 4, 4))
    assert 0 < soft[24, 28] < 255 and soft[36, 28] == 255 and soft[0, 0] == 0


@pytest.mark.parametrize("full_res", [False, True])
@pytest.mark.parametrize("fill", [0, 1, 2, 3])
@pytest.mark.parametrize("blur", [0, 4])
def test_unmasked_pixels_come_back_unchanged(full_res, fill, blur):
    image = noise_image(96, 80)
    mask = box_mask(image.size, (30, 20, 62, 44))
    opts = InpaintOptions(mask_blur=blur, inpaint_full_res=full_res, inpaint_full_res_padding=8,
                          inpainting_fill=fill)
    width, height = (64, 64) if full_res else image.size
    prepared = prepare(image, mask, width, height, opts)
    assert prepared.image.size == prepared.mask.size == (width, height)
    out = np.asarray(paste_back(noise_image(width, height), prepared))
    assert out.shape == (80, 96, 3)
    untouched = np.asarray(blur_mask(mask, blur, blur)) == 0
    assert untouched.sum() > 0.5 * untouched.size
    assert np.array_equal(out[untouched], np.asarray(image)[untouched])


def test_whole_picture_result_shows_through_a_hard_mask():
    image, generated = noise_image(64, 48), noise_image(64, 48)
    mask = box_mask(image.size, (8, 8, 40, 32))
    prepared = prepare(image, mask, 64, 48, InpaintOptions(mask_blur=0, inpaint_full_res=False))
    out, inside = np.asarray(paste_back(generated, prepared)), np.asarray(mask) == 255
    assert prepared.paste_to is None
    assert np.array_equal(out[inside], np.asarray(generated)[inside])


def test_only_masked_pastes_the_crop_back_at_its_box():
    image, generated = noise_image(128, 96), noise_image(64, 64)
    mask = box_mask(image.size, (40, 30, 72, 46))
    prepared = prepare(image, mask, 64, 64, InpaintOptions(mask_blur=0, inpaint_full_res_padding=8))
    x, y, w, h = prepared.paste_to
    assert (x, y, w, h) == (32, 14, 48, 48)          # (32, 22, 80, 54) grown to 1:1
    out = np.asarray(paste_back(generated, prepared))
    crop = np.asarray(resize_image(1, generated, w, h))
    sub = np.asarray(mask)[y:y + h, x:x + w] == 255
    assert np.array_equal(out[y:y + h, x:x + w][sub], crop[sub])


def test_blank_mask_with_only_masked_falls_back_to_the_whole_picture():
    image = noise_image(64, 64)
    prepared = prepare(image, box_mask(image.size, (0, 0, 0, 0)), 64, 64, InpaintOptions())
    assert prepared.paste_to is None
    assert np.array_equal(np.asarray(paste_back(noise_image(64, 64), prepared)), np.asarray(image))


def test_invert_repaints_the_outside_instead():
    image = noise_image(64, 64)
    mask = box_mask(image.size, (16, 16, 48, 48))
    prepared = prepare(image, mask, 64, 64, InpaintOptions(mask_blur=0, inpaint_full_res=False,
                                                           inpainting_mask_invert=1))
    assert np.array_equal(np.asarray(prepared.mask), 255 - np.asarray(mask))
    out, inside = np.asarray(paste_back(noise_image(64, 64), prepared)), np.asarray(mask) == 255
    assert np.array_equal(out[inside], np.asarray(image)[inside])


def test_fill_prefills_the_masked_area_and_original_keeps_it():
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[..., 0] = 200                                            # red picture
    pixels[16:48, 16:48] = (0, 0, 255)                              # blue square under the mask
    image, mask = Image.fromarray(pixels), box_mask((64, 64), (16, 16, 48, 48))
    opts = dict(mask_blur=0, inpaint_full_res=False)
    filled = np.asarray(prepare(image, mask, 64, 64, InpaintOptions(inpainting_fill="fill", **opts)).image)
    kept = np.asarray(prepare(image, mask, 64, 64, InpaintOptions(inpainting_fill="original", **opts)).image)
    assert np.array_equal(kept, pixels)
    centre = filled[24:40, 24:40].reshape(-1, 3).mean(0)
    assert centre[0] > 150 and centre[2] < 30                       # red flowed in, blue gone
    assert np.array_equal(filled[np.asarray(mask) == 0], pixels[np.asarray(mask) == 0])


def test_rgba_mask_uses_its_alpha():
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[8:16, 8:16, 3] = 255
    prepared = prepare(noise_image(32, 32), Image.fromarray(rgba, "RGBA"), 32, 32,
                       InpaintOptions(mask_blur=0, inpaint_full_res=False))
    assert np.array_equal(np.asarray(prepared.mask), np.asarray(box_mask((32, 32), (8, 8, 16, 16))))


def test_fill_names_and_integers_agree():
    assert [fill_index(n) for n in FILL_MODES] == [0, 1, 2, 3] == [fill_index(i) for i in range(4)]
    assert InpaintOptions(inpainting_fill="Latent Noise").inpainting_fill == 2


def test_latent_fills_and_blend_math():
    init = RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)
    noise = RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)
    m = np.zeros((1, 1, 8, 8), np.float32)
    m[..., 2:5, 3:7] = 1
    inside, outside = np.broadcast_to(m == 1, init.shape), np.broadcast_to(m == 0, init.shape)
    noisy = initial_latents(init, m, "latent noise", noise)
    assert np.array_equal(noisy[inside], noise[inside]) and np.array_equal(noisy[outside], init[outside])
    empty = initial_latents(init, m, 3)
    assert not empty[inside].any() and np.array_equal(empty[outside], init[outside])
    assert initial_latents(init, m, 0) is init and initial_latents(init, m, "original") is init
    blended = blend_latents(noise, init, m)
    assert np.array_equal(blended[inside], noise[inside]) and np.array_equal(blended[outside], init[outside])


def test_latent_mask_is_rounded_at_latent_size():
    prepared = prepare(noise_image(64, 64), box_mask((64, 64), (0, 0, 32, 64)), 64, 64,
                       InpaintOptions(mask_blur=0, inpaint_full_res=False))
    lm = prepared.latent_mask(8, 8)
    assert lm.shape == (1, 1, 8, 8) and set(np.unique(lm)) == {0.0, 1.0}
    assert lm[0, 0, :, :4].all() and not lm[0, 0, :, 4:].any()


@pytest.mark.parametrize("full_res", [False, True])
def test_outpaint_keeps_the_original_region_pixel_for_pixel(full_res):
    image = noise_image(48, 40)
    out = outpaint_canvas(image, left=16, top=8, right=0, bottom=24)
    canvas, mask = out
    assert canvas.size == mask.size == (64, 72) and out.keep == (16, 8, 64, 48)
    m = np.asarray(mask)
    assert not m[8:48, 16:].any() and (m[:8] == 255).all() and (m[:, :16] == 255).all()
    assert np.array_equal(np.asarray(canvas)[8:48, :16], np.repeat(np.asarray(image)[:, :1], 16, axis=1))
    prepared = prepare(canvas, mask, 64, 72, InpaintOptions(mask_blur=4, inpaint_full_res=full_res), keep=out.keep)
    result = np.asarray(paste_back(noise_image(64, 72), prepared))
    assert np.array_equal(result[8:48, 16:64], np.asarray(image))
    assert not np.array_equal(result[:8], np.asarray(canvas)[:8])     # the new area was repainted


def one_line_error(call) -> str:
    """Run call, expecting a one-line UserError; return its message."""
    with pytest.raises(UserError) as e:
        call()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_input_gives_one_line_errors():
    image = noise_image(64, 64)
    assert "padding" in one_line_error(lambda: InpaintOptions(inpaint_full_res_padding=-1))
    assert "mask blur" in one_line_error(lambda: InpaintOptions(mask_blur=-2))
    assert "fill" in one_line_error(lambda: InpaintOptions(inpainting_fill=7))
    assert "fill" in one_line_error(lambda: InpaintOptions(inpainting_fill="blur"))
    assert "multiple of 8" in one_line_error(lambda: outpaint_canvas(image, left=12))
    assert "multiple of 8" in one_line_error(lambda: outpaint_canvas(image, bottom=-8))
    assert "at least one side" in one_line_error(lambda: outpaint_canvas(image))
    assert "same size" in one_line_error(lambda: prepare(image, box_mask((32, 64), (0, 0, 8, 8)), 64, 64))
    assert "multiples of 8" in one_line_error(lambda: prepare(image, box_mask((64, 64), (0, 0, 8, 8)), 60, 64))
    prepared = prepare(image, box_mask((64, 64), (0, 0, 8, 8)), 64, 64)
    assert "expected 64x64" in one_line_error(lambda: paste_back(noise_image(32, 32), prepared))
