#!/usr/bin/perl
# tests/cuda_emu: turns a .cu file into C++ the host compiler takes, for the
# CUDA emulator build: every `kernel<<<grid, block, shmem, stream>>>(args)`
# becomes `ts_emu_launch_fn(ts_emu_cfg(grid, block, shmem, stream),
# "kernel", kernel, args)` (tests/cuda_emu/emu_device.h). Nothing else
# changes, and no line is added or removed, so the #line below keeps
# compiler messages pointing at the .cu file.
# Usage: rewrite_launches.pl IN.cu OUT.cpp
use strict;
use warnings;
my ($in, $out) = @ARGV;
die "usage: $0 IN.cu OUT.cpp\n" unless defined $out;
open(my $fh, '<', $in) or die "$0: cannot read $in: $!\n";
local $/;
my $src = <$fh>;
close $fh;
my $n = ($src =~ s{([A-Za-z_]\w*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(}{ts_emu_launch_fn(ts_emu_cfg($2), "$1", $1, }gs);
# A launch the pattern missed would be a compile error anyway; say so here.
die "$0: $in: a <<< >>> launch was not rewritten\n" if $src =~ /<<<|>>>/;
my $tmp = "$out.tmp";
open(my $oh, '>', $tmp) or die "$0: cannot write $tmp: $!\n";
print $oh "#line 1 \"$in\"\n", $src;
close $oh or die "$0: cannot write $tmp: $!\n";
rename $tmp, $out or die "$0: cannot rename $tmp to $out: $!\n";
