// MSBuild inline task (see LibstdcxxCompat.targets): marks one symbol-version requirement of an
// ELF64 little-endian shared library as weak, when the host's libstdc++ does not define it.
using System;
using System.IO;
using System.Text;
using Microsoft.Build.Framework;
using Microsoft.Build.Utilities;

public class HastWeakenElfVersionNeed : Task
{
    [Required] public ITaskItem[] Files { get; set; }
    [Required] public string VersionName { get; set; }

    const uint SHT_GNU_verneed = 0x6ffffffe;
    const ushort VER_FLG_WEAK = 0x2;

    static readonly string[] LibstdcxxCandidates =
    {
        "/usr/lib/x86_64-linux-gnu/libstdc++.so.6", "/lib/x86_64-linux-gnu/libstdc++.so.6",
        "/usr/lib/aarch64-linux-gnu/libstdc++.so.6", "/usr/lib64/libstdc++.so.6", "/usr/lib/libstdc++.so.6",
    };

    public override bool Execute()
    {
        string host = null;
        foreach (var c in LibstdcxxCandidates) if (File.Exists(c)) { host = c; break; }
        if (host == null)
        {
            Log.LogMessage(MessageImportance.Normal, "HastWeaken: no system libstdc++ found; leaving TorchSharp as shipped.");
            return true;
        }
        if (Contains(File.ReadAllBytes(host), Encoding.ASCII.GetBytes(VersionName + "\0")))
        {
            Log.LogMessage(MessageImportance.Normal, $"HastWeaken: {host} provides {VersionName}; no patch needed.");
            return true;
        }
        foreach (var item in Files)
        {
            var path = item.GetMetadata("FullPath");
            try
            {
                var bytes = File.ReadAllBytes(path);
                var changed = Weaken(bytes, VersionName);
                if (changed == null)
                    Log.LogMessage(MessageImportance.Normal, $"HastWeaken: {path} does not require {VersionName} strongly.");
                else
                {
                    var tmp = path + ".hast-tmp";
                    File.WriteAllBytes(tmp, changed);
                    File.Replace(tmp, path, null);
                    Log.LogMessage(MessageImportance.High, $"HastWeaken: marked {VersionName} weak in {path} (host libstdc++ lacks it).");
                }
            }
            catch (Exception e)
            {
                Log.LogError($"HastWeaken: cannot patch {path}: {e.Message}");
                return false;
            }
        }
        return !Log.HasLoggedErrors;
    }

    static bool Contains(byte[] hay, byte[] needle)
    {
        for (int i = 0; i + needle.Length <= hay.Length; i++)
        {
            if (hay[i] != needle[0]) continue;
            int j = 1;
            while (j < needle.Length && hay[i + j] == needle[j]) j++;
            if (j == needle.Length) return true;
        }
        return false;
    }

    /// Returns the patched image, or null when nothing needed changing.
    static byte[] Weaken(byte[] b, string version)
    {
        if (b.Length < 64 || b[0] != 0x7f || b[1] != (byte)'E' || b[2] != (byte)'L' || b[3] != (byte)'F')
            throw new InvalidDataException("not an ELF file");
        if (b[4] != 2 || b[5] != 1) throw new InvalidDataException("only ELF64 little-endian is supported");
        ulong shoff = BitConverter.ToUInt64(b, 0x28);
        int shentsize = BitConverter.ToUInt16(b, 0x3A), shnum = BitConverter.ToUInt16(b, 0x3C);
        bool changed = false;
        for (int i = 0; i < shnum; i++)
        {
            int sh = checked((int)shoff + i * shentsize);
            if (BitConverter.ToUInt32(b, sh + 4) != SHT_GNU_verneed) continue;
            int link = (int)BitConverter.ToUInt32(b, sh + 40);
            int off = checked((int)BitConverter.ToUInt64(b, sh + 24));
            int strSh = checked((int)shoff + link * shentsize);
            int strOff = checked((int)BitConverter.ToUInt64(b, strSh + 24));
            while (true)
            {
                int cnt = BitConverter.ToUInt16(b, off + 2);
                int aux = off + (int)BitConverter.ToUInt32(b, off + 8);
                for (int k = 0; k < cnt; k++)
                {
                    int name = strOff + (int)BitConverter.ToUInt32(b, aux + 8);
                    int end = Array.IndexOf(b, (byte)0, name);
                    if (Encoding.ASCII.GetString(b, name, end - name) == version)
                    {
                        ushort flags = BitConverter.ToUInt16(b, aux + 4);
                        if ((flags & VER_FLG_WEAK) == 0)
                        {
                            BitConverter.GetBytes((ushort)(flags | VER_FLG_WEAK)).CopyTo(b, aux + 4);
                            changed = true;
                        }
                    }
                    int next = (int)BitConverter.ToUInt32(b, aux + 12);
                    if (next == 0) break;
                    aux += next;
                }
                int vnNext = (int)BitConverter.ToUInt32(b, off + 12);
                if (vnNext == 0) break;
                off += vnNext;
            }
        }
        return changed ? b : null;
    }
}
