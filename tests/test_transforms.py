"""SimCLRTransform (per-sample torchvision v2 transform) and ragged_collate: the same views as the batch op
given the same parameters, inside a 2-worker DataLoader, in v2.Compose, for PIL / tensor / tv_tensors
inputs; lightly's argument names; errors."""
import PIL.Image
import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from simclr_ext import SimCLRAugment, SimCLRTransform, augment, ragged_collate

LIGHTLY_ARGS = dict(input_size=24, cj_prob=0.9, cj_strength=0.5, min_scale=0.2, random_gray_scale=0.3,
                    gaussian_blur=0.6, sigmas=(0.2, 1.5), hf_prob=0.4,
                    normalize={"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]})


def _batch_op(**lightly):
    """The batch augmentation with SimCLRAugment's own names for the same settings."""
    return SimCLRAugment(size=lightly["input_size"], scale=(lightly["min_scale"], 1.0), flip_p=lightly["hf_prob"],
                         jitter_p=lightly["cj_prob"], jitter_strength=lightly["cj_strength"],
                         grayscale_p=lightly["random_gray_scale"], blur_p=lightly["gaussian_blur"],
                         blur_sigma=lightly["sigmas"], mean=lightly["normalize"]["mean"],
                         std=lightly["normalize"]["std"])


def _image(i, base_seed):
    """Image i: a different size per index, every other one a PIL image."""
    g = torch.Generator().manual_seed(base_seed + 1000 + i)
    h, w = 20 + 3 * i, 31 - 2 * i
    x = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    return TF.to_pil_image(x) if i % 2 else x


class _Images(Dataset):
    def __init__(self, transform, base_seed, n=8):
        self.transform, self.base_seed, self.n = transform, base_seed, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        torch.manual_seed(self.base_seed + i)  # per-sample seed: reproducible whichever worker runs it
        v0, v1 = self.transform(_image(i, self.base_seed))
        return v0, v1, torch.get_num_threads()


def test_two_worker_dataloader_gives_the_batch_ops_views(gen):
    base = int(torch.randint(0, 2**30, (), generator=gen))
    transform = SimCLRTransform(**LIGHTLY_ARGS)
    loader = DataLoader(_Images(transform, base), batch_size=3, num_workers=2)
    got0, got1, threads = (torch.cat(x) for x in zip(*loader))
    assert threads.tolist() == [1] * 8, "one intra-op thread per worker"
    aug = _batch_op(**LIGHTLY_ARGS)
    for i in range(8):
        image = _image(i, base)
        image = image if isinstance(image, torch.Tensor) else TF.pil_to_tensor(image)
        params = aug.sample([image, image], torch.Generator().manual_seed(base + i))
        expected = aug.view([image, image], params)
        assert torch.equal(got0[i], expected[0]) and torch.equal(got1[i], expected[1]), f"sample {i}"
    assert not torch.equal(got0, got1)


def _many_threads(worker_id):
    torch.set_num_threads(3)


def test_one_thread_even_when_a_worker_init_fn_raised_it(gen):
    base = int(torch.randint(0, 2**30, (), generator=gen))
    loader = DataLoader(_Images(SimCLRTransform(**LIGHTLY_ARGS), base, n=4), batch_size=2, num_workers=2,
                        worker_init_fn=_many_threads)
    assert torch.cat([batch[2] for batch in loader]).tolist() == [1] * 4


def test_compose_structures_and_input_types(gen):
    t = SimCLRTransform(**LIGHTLY_ARGS)
    x = torch.randint(0, 256, (3, 17, 26), generator=gen, dtype=torch.uint8)
    torch.manual_seed(5)
    ref = t(x)
    assert isinstance(ref, list) and len(ref) == 2 and ref[0].shape == (3, 24, 24) and ref[0].dtype == torch.float32
    for inpt in (TF.to_pil_image(x), tv_tensors.Image(x)):
        torch.manual_seed(5)
        out = v2.Compose([v2.ToImage(), t])(inpt)  # ToImage draws no randomness
        assert all(isinstance(v, tv_tensors.Image) for v in out)
        assert all(torch.equal(a, b) for a, b in zip(out, ref))
    torch.manual_seed(5)
    (views, label) = t((TF.to_pil_image(x), 7))  # a (sample, target) pair: only the image is transformed
    assert label == 7 and all(torch.equal(a, b) for a, b in zip(views, ref))
    # float [0, 1] input: the same views as uint8 up to float rounding of the / 255
    torch.manual_seed(5)
    flt = t(x.float() / 255)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(flt, ref))


def test_gray_and_palette_images(gen):
    gray = torch.randint(0, 256, (1, 15, 15), generator=gen, dtype=torch.uint8)
    rgb = SimCLRTransform(**LIGHTLY_ARGS)
    torch.manual_seed(1)
    a = rgb(TF.to_pil_image(gray))  # mode L under an RGB normalization: gray in every channel
    torch.manual_seed(1)
    b = rgb(gray.expand(3, -1, -1).contiguous())
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    one = SimCLRTransform(input_size=8, normalize=None)
    assert one(gray)[0].shape == (1, 8, 8)
    pal = TF.to_pil_image(torch.randint(0, 256, (3, 10, 12), generator=gen, dtype=torch.uint8)).convert("P")
    assert rgb(pal)[1].shape == (3, 24, 24)


def test_rotation_follows_lightly(gen):
    image = torch.zeros((), dtype=torch.uint8).expand(3, 20, 20)
    quarter = SimCLRTransform(input_size=8, rr_prob=1.0)  # rr_degrees=None: a quarter turn
    assert quarter.sample_views(image, gen).angle.tolist() == [90.0, 90.0]
    off = SimCLRTransform(input_size=8)
    assert off.sample_views(image, gen).angle.tolist() == [0.0, 0.0]
    ranged = SimCLRTransform(input_size=8, rr_prob=0.5, rr_degrees=(10, 20))
    angles = torch.cat([ranged.sample_views(image, gen).angle for _ in range(400)])
    turned = angles != 0
    assert 0.4 < turned.float().mean().item() < 0.6
    assert ((angles[turned] >= 10) & (angles[turned] <= 20)).all()
    sym = SimCLRTransform(input_size=8, rr_prob=1.0, rr_degrees=30)
    angles = torch.cat([sym.sample_views(image, gen).angle for _ in range(200)])
    assert angles.min() >= -30 and angles.max() <= 30 and angles.min() < -20 and angles.max() > 20


def test_argument_mapping_and_errors():
    t = SimCLRTransform(**LIGHTLY_ARGS, solarize_p=0.1, blur_kernel=5)  # extra SimCLRAugment knobs pass through
    a = t.augment
    assert (a.size, a.scale, a.flip_p, a.jitter_p, a.jitter_strength, a.grayscale_p, a.blur_p, a.blur_sigma) == \
        ((24, 24), (0.2, 1.0), 0.4, 0.9, 0.5, 0.3, 0.6, (0.2, 1.5))
    assert a.mean == (0.5, 0.4, 0.3) and a.solarize_p == 0.1 and a.blur_kernel == 5
    with pytest.raises(TypeError, match="lightly's argument names; 'size' is set by them"):
        SimCLRTransform(size=32)
    with pytest.raises(ValueError, match="min_scale must be in"):
        SimCLRTransform(min_scale=0)
    with pytest.raises(ValueError, match="rr_prob must be a probability"):
        SimCLRTransform(rr_prob=2)
    with pytest.raises(TypeError, match="rr_degrees must be None, a number or a"):
        SimCLRTransform(rr_degrees="90")
    with pytest.raises(ValueError, match="rr_degrees must be a finite range"):
        SimCLRTransform(rr_degrees=(20, 10))
    with pytest.raises(TypeError, match="normalize must be None or a dict"):
        SimCLRTransform(normalize=(0.5, 0.5))
    with pytest.raises(TypeError, match="unexpected keyword argument 'vf_prob'"):
        SimCLRTransform(vf_prob=0.5)


def test_bad_inputs(gen):
    t = SimCLRTransform(input_size=8)
    with pytest.raises(ValueError, match="PIL images of mode 'RGBA' are not supported"):
        t(PIL.Image.new("RGBA", (9, 9)))
    with pytest.raises(ValueError, match=r"one \(C, H, W\) image, got a tensor of shape \(2, 3, 9, 9\)"):
        t(torch.zeros(2, 3, 9, 9, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"float images must be in \[0, 1\].*divide 0\.\.255 pixels by 255"):
        t(torch.rand(3, 9, 9, generator=gen) * 255)
    with pytest.raises(ValueError, match="1 or all have 3 channels"):
        t(torch.zeros(4, 9, 9, dtype=torch.uint8))
    with pytest.raises(TypeError, match="Mask inputs are not supported"):
        t(tv_tensors.Image(torch.zeros(3, 9, 9, dtype=torch.uint8)), tv_tensors.Mask(torch.zeros(9, 9)))
    with pytest.raises(ValueError, match="one image per call, got 2 images"):
        t(tv_tensors.Image(torch.zeros(3, 9, 9, dtype=torch.uint8)), tv_tensors.Image(torch.zeros(3, 9, 9)))


def test_ragged_collate_feeds_the_batch_op(gen):
    samples = [(torch.randint(0, 256, (3, 10 + i, 14 - i), generator=gen, dtype=torch.uint8), i) for i in range(3)]
    samples.append((TF.to_pil_image(torch.randint(0, 256, (3, 9, 9), generator=gen, dtype=torch.uint8)), 3))
    images, labels = ragged_collate(samples)
    assert [tuple(im.shape) for im in images] == [(3, 10, 14), (3, 11, 13), (3, 12, 12), (3, 9, 9)]
    assert labels.tolist() == [0, 1, 2, 3] and torch.equal(images[0], samples[0][0])
    aug = SimCLRAugment(size=8, blur_kernel=3)
    params = aug.sample(images, torch.Generator().manual_seed(0))
    out = augment(images, params, mean=aug.mean, std=aug.std)
    for i, im in enumerate(images):  # each image alone gives its row of the batch
        one = SimCLRAugment(size=8, blur_kernel=3).sample([im], torch.Generator().manual_seed(0))
        for f in ("top", "left", "height", "width"):
            setattr(one, f, getattr(params, f)[i:i + 1])
        for f in ("flip", "angle", "jitter", "brightness", "contrast", "saturation", "hue", "order", "grayscale",
                  "blur", "sigma", "solarize"):
            setattr(one, f, getattr(params, f)[i:i + 1])
        assert torch.equal(augment([im], one, mean=aug.mean, std=aug.std)[0], out[i])
    assert len(ragged_collate([s[0] for s in samples])) == 4
    with pytest.raises(ValueError, match="non-empty list of samples"):
        ragged_collate([])
    with pytest.raises(ValueError, match=r"ragged_collate takes \(C, H, W\) images, got Tensor of shape \(9, 9\)"):
        ragged_collate([torch.zeros(9, 9)])
